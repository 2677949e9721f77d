"""The model family interface: everything the trainer may ask of a model family.

A family module (wan.py, ...) is the only place that knows how its parts load, how it encodes
prompts and pixels, how its transformer is called, how its LoRA keys are named and which stock
diffusers pipeline samples it. The training loop only talks to this interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch

from ..config import TrainConfig


class ModelLoadError(Exception):
    """A model part that could not be loaded; the message says which, from where, and what to do."""


@dataclass
class Expert:
    """One transformer this run trains, and the noise levels it serves."""

    name: str  # the pipeline attribute: "transformer" or "transformer_2"
    label: str  # "" for a single transformer; "high_noise" / "low_noise" for WAN 2.2 A14B
    module: torch.nn.Module
    sigma_range: tuple[float, float]  # [low, high); the top expert's range includes 1.0


@dataclass
class Conditioning:
    """What a batch is conditioned on besides its text: a first frame (image-to-video)."""

    latents: torch.Tensor  # the family's condition tensor, one row per sample
    rows: torch.Tensor  # (B,) bool: the samples that are conditioned
    loss_frames: torch.Tensor | None = None  # (B, F') 1 for latent frames in the loss, 0 for given ones
    image_embeds: torch.Tensor | None = None  # (B, tokens, dim) the first frame through an image encoder

    def select(self, rows: torch.Tensor) -> "Conditioning":
        def pick(tensor):
            return None if tensor is None else tensor[rows.to(tensor.device)]

        return Conditioning(pick(self.latents), pick(self.rows), pick(self.loss_frames), pick(self.image_embeds))


@dataclass
class SampleRequest:
    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None
    frames: int
    height: int
    width: int
    steps: int
    cfg_scale: float
    seed: int
    image: np.ndarray | None = None  # image-to-video: the first frame, uint8 (H, W, 3)


class ModelFamily(ABC):
    #: the transformer's input size must be a multiple of this (VAE factor × patch size)
    spatial_multiple: int
    #: frames per latent frame (the VAE's temporal factor); valid clip lengths are 4n+1 for 4
    temporal_factor: int
    #: how clip lengths are rounded, for the log
    frame_rule = "the VAE takes 4n+1"
    #: the dtype the text encoder runs in (part of the text cache's key)
    text_dtype: torch.dtype

    def __init__(self, config: TrainConfig, device: torch.device):
        self.config = config
        self.device = device

    def valid_frame_count(self, frames: int) -> int:
        """The largest frame count the VAE accepts that is <= `frames` (4n+1 for a factor of 4)."""
        return ((frames - 1) // self.temporal_factor) * self.temporal_factor + 1 if frames >= 1 else 0

    #: encoder kind ("vae", "text") → the model parts (subfolders) whose files decide its outputs
    ENCODER_PARTS: dict[str, tuple[str, ...]]

    @abstractmethod
    def load_transformers(self) -> None:
        """Load the transformer(s) and scheduler from `config.base_model_name` (or per-part `model_name`)."""

    @abstractmethod
    def load_vae(self) -> None:
        """Load the VAE (once) and put it on the training device."""

    @abstractmethod
    def release_vae(self) -> None:
        """Free the VAE."""

    @abstractmethod
    def park_vae(self) -> None:
        """Move the VAE off the training device until it is needed again."""

    @abstractmethod
    def load_text_encoder(self) -> None:
        """Load the tokenizer(s) and text encoder(s)."""

    @abstractmethod
    def encode_prompts(self, prompts: list[str], grad: bool = False) -> torch.Tensor:
        """Text embeddings exactly as the stock pipeline computes them, one row per prompt. `grad`: with the
        autograd graph, on the training device (a text encoder or embedding that trains)."""

    def text_encoders(self) -> dict[str, tuple]:
        """name → (tokenizer, text encoder), loaded if need be: what embeddings and text-encoder training use."""
        raise NotImplementedError(f"{type(self).__name__} has no text-encoder training yet")

    @abstractmethod
    def release_text_encoder(self) -> None:
        """Free the text encoder once every prompt the run needs is encoded."""

    @abstractmethod
    def encode_video(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 (F, H, W, 3) frames → normalised latents (C, F', H', W') as the pipeline's denoiser sees them."""

    @abstractmethod
    def trained_experts(self) -> list[Expert]:
        """The transformer(s) this run trains (two for WAN 2.2 A14B with experts: both)."""

    def route(self, sigma: torch.Tensor) -> list[tuple[Expert, torch.Tensor]]:
        """Each trained expert with the batch rows whose noise level it serves."""
        routed = []
        for expert in self.trained_experts():
            low, high = expert.sigma_range
            rows = ((sigma >= low) & ((sigma < high) | (high >= 1.0))).nonzero().flatten()
            if len(rows):
                routed.append((expert, rows))
        return routed

    def activate(self, expert: Expert) -> None:
        """Put `expert` on the training device; on an accelerator, the other transformers wait on the CPU."""
        if getattr(self, "_active", None) is expert.module:  # `.to()` walks every module even when nothing moves
            return
        self._active = expert.module
        expert.module.to(self.device)

    def fsdp_units(self, module: torch.nn.Module) -> list[torch.nn.Module]:
        """The parts FSDP2 shards one by one (each gathered just before its forward): the transformer blocks."""
        return list(module.blocks)

    #: whether clips carry an image-encoder embedding of their first frame (`encode_first_frame`)
    encodes_first_frame: bool = False

    def encode_first_frame(self, frame: np.ndarray) -> torch.Tensor:
        """The image encoder's embedding of a clip's first frame, as the stock pipeline computes it."""
        raise NotImplementedError(f"{type(self).__name__} has no image encoder")

    def split_conditioning(self, stored: torch.Tensor, generator: torch.Generator,
                           image_embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, Conditioning | None]:
        """A batch of cached latents (and first-frame image embeddings) → (the latents to denoise, what they
        are conditioned on). Text-only families return (stored, None); `generator` draws which samples are
        conditioned where that varies."""
        return stored, None

    @abstractmethod
    def predict(self, noisy: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor, expert: Expert,
                conditioning: Conditioning | None = None) -> torch.Tensor:
        """The expert's flow prediction for noisy latents at noise levels `sigma` (B,)."""

    def set_frame_local_attention(self, expert: Expert, enabled: bool) -> None:
        """Self-attention within each latent frame only (use_temporal_attention: false)."""
        raise NotImplementedError(f"{type(self).__name__} has no frame-local attention")

    @abstractmethod
    def lora_target_modules(self, module: torch.nn.Module, layer_filter: str) -> list[str]:
        """Names of the Linear modules of `module` a LoRA adapts, by default or filtered by `layer_filter`."""

    @abstractmethod
    def save_diffusers_lora(self, directory: str, weight_name: str, state_dict: dict, adapter_metadata: dict) -> None:
        """Write a LoRA in the format the stock pipeline's `load_lora_weights` reads."""

    @abstractmethod
    def single_file_state_dict(self, module: torch.nn.Module, dtype: torch.dtype, state: dict | None = None) -> dict:
        """A transformer's weights (or `state`, its gathered state dict) named as the family's original
        single-file checkpoints (ComfyUI's)."""

    @abstractmethod
    def comfy_lora_key(self, peft_module_name: str) -> str:
        """The ComfyUI name of one adapted module (without `.lora_A.weight`)."""

    @abstractmethod
    def comfy_lora_parts(self, peft_module_name: str) -> list[str]:
        """The diffusers modules that the original module named by `comfy_lora_key` fuses, in its order (the
        module itself when the original layout fuses nothing)."""

    @abstractmethod
    def comfy_lora_keeps_alpha(self, peft_module_name: str) -> bool:
        """Whether the original-layout entry keeps a `.alpha` key (else alpha / rank is folded into lora_B): it
        must be what both diffusers' converter and ComfyUI's loader accept there."""

    @abstractmethod
    def sample(self, request: SampleRequest) -> np.ndarray:
        """Render a video with the stock diffusers pipeline; uint8 (F, H, W, 3)."""
