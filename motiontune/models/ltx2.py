"""LTX-2, LTX-2.3 and LTX-2.5 (Lightricks' audio-video models), as the stock `LTX2Pipeline` runs them: video and its
sound are denoised together by one transformer, and trained together here. Each checkpoint is its own model type
(`LTX_2`, `LTX_2_3`, `LTX_2_5`: a LoRA only works on the model it was trained on); what differs between them is in
`VERSIONS` and docs/config.md, and loading checks the checkpoint is the one the model type names.

- Prompts: Gemma 3 reads the prompt (stripped; left-padded to 1024 tokens); every hidden state (the embeddings and
  each layer's) is stacked per token, and the pipeline's `LTX2TextConnectors` turn that stack into the video and the
  audio text embeddings and their mask. The connectors are frozen, so the cached row per prompt is their output:
  [tokens, video width, audio width, video embeds (L×Dv), audio embeds (L×Da), mask (L)], flat float32.
- Video latents: the VAE's mean, normalised per channel with the VAE's `latents_mean` / `latents_std` (and
  `scaling_factor`); 32x spatial, 8x temporal compression, so clips are 8n+1 frames. The transformer reads them as
  tokens (`_pack_latents`, patch 1).
- Sound: the clip's audio resampled to 16 kHz stereo over exactly the clip's window (frames / fps seconds from its
  first frame, as the pipeline's duration), a log-mel spectrogram (1024-point STFT, hop 160, Hann window, Slaney
  mel scale and norm, log of the magnitude clamped at 1e-5, as ltx-core's AudioProcessor), the audio VAE's mean,
  packed to (L, channels × mel bins) and normalised with the audio VAE's `latents_mean` / `latents_std`, as the
  pipeline normalises packed audio latents. L = round(frames / fps × 16000 / 160 / 4), the pipeline's
  `audio_num_frames`.
- Flow: the shared convention (x_t = (1-σ)x0 + σε, target ε - x0); the transformer takes t = 1000σ for both the
  timestep and `sigma` inputs (2.3 and later modulate the prompt cross-attention with `sigma`), and the video's frame
  rate for its positions. The audio's σ is its own (`audio_noise_level`); the cross-modal attention is modulated with
  the other modality's σ from 2.3 on (`use_cross_timestep`), with its own in LTX-2.0.
- A clip without sound trains the video alone: its audio tokens are pure noise at σ = 1 (what the pipeline's first
  step shows the transformer) and its audio loss is left out; nothing teaches the model silence.
- In-context control (`in_context_control`, an IC-LoRA), as `LTX2InContextPipeline` runs a reference condition at
  strength 1: each clip's `-control` video is encoded by the VAE (its mode, normalised without `scaling_factor`, as
  the pipeline's reference latents are) and its tokens are appended after the clip's noisy ones, at the same
  positions (the clip's own grid and frame rate), clean and at timestep 0, in one self-attention with them. Only the
  clip's tokens are predicted and in the loss. The video alone trains (`train_audio` false): a control says nothing
  of the sound.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

from ..util.lazy import no_grad, np, torch
from .base import Conditioning, Expert, ModelFamily, SampleRequest, Sound, to_uint8
from .loading import ModelLoadError, load_part
from .packing import FORMAT as PACKED, pack, unpack

MAX_SEQUENCE_LENGTH = 1024  # the pipeline's default
N_FFT = 1024  # ltx-core reads it from its audio VAE config, which diffusers does not carry: 1024 not checked here
AUDIO_TEMPORAL_COMPRESSION = 4  # AutoencoderKLLTX2Audio.temporal_compression_ratio (fixed in diffusers)

# every attention projection (video, audio, and the audio↔video cross-attention) and both feed-forwards: the stock
# joint audio-video LoRA of the LTX-2 trainer
_DEFAULT_TARGETS = (".to_q", ".to_k", ".to_v", ".to_out.0", ".ff.net.0.proj", ".ff.net.2", ".audio_ff.net.0.proj",
                    ".audio_ff.net.2")


@dataclass(frozen=True)
class Version:
    """What one LTX checkpoint does differently (the pipeline reads the rest from its configs)."""

    name: str
    text_encoder: str  # the transformers class of its text encoder (model_index.json names it too)
    vocoder: str  # the diffusers class of its vocoder (2.3 on: a bandwidth-extension stage to 48 kHz)
    cross_timestep: bool  # cross-modal attention modulated by the other modality's σ (2.3 on) or its own (2.0)


VERSIONS = {
    "LTX_2": Version("LTX-2", "Gemma3ForConditionalGeneration", "LTX2Vocoder", cross_timestep=False),
    "LTX_2_3": Version("LTX-2.3", "Gemma3ForConditionalGeneration", "LTX2VocoderWithBWE", cross_timestep=True),
    "LTX_2_5": Version("LTX-2.5", "Gemma4UnifiedForConditionalGeneration", "LTX2VocoderWithBWE", cross_timestep=True),
}


def checkpoint_version(transformer_config) -> str:
    """The model type a transformer config belongs to: 2.3 added the prompt cross-attention modulation
    (`cross_attn_mod`), 2.5 the keyframe position embedding."""
    if not transformer_config.get("cross_attn_mod", False):
        return "LTX_2"
    return "LTX_2_5" if transformer_config.get("use_keyframes_abs_pos_embedding", False) else "LTX_2_3"


class LTX2Family(ModelFamily):
    MODEL_TYPES = tuple(VERSIONS)
    NAME = "LTX-2"
    TINY_MODELS = ("ltx-2", "ltx-2.3", "ltx-2.5")
    LORA_PIPELINE = "LTX2Pipeline"
    VAE_CLASS = "AutoencoderKLLTX2Video"
    VAE_COMPRESSION = (32, 8)
    temporal_factor = 8
    spatial_multiple = 32  # the VAE's 32x, patch 1
    #: the VAE decoder's first convolution pads each latent side by one pixel, mirrored: a side needs two latent
    #: pixels, so a sample smaller than this (after rounding down to 32) fails to decode at the end of training
    SMALLEST_SAMPLE_SIDE = 2 * spatial_multiple
    frame_rule = "the VAE takes 8n+1"
    AUDIO_SAMPLE_RATE = 16000
    AUDIO_CHANNELS = 2
    ENCODER_PARTS = {"vae": ("vae", "audio_vae"), "text": ("tokenizer", "text_encoder", "connectors")}
    IN_CONTEXT_CONTROL = True
    # context parallel: the video tokens split as diffusers' plan splits them (corrected: `context_parallel_plan`),
    # the audio tokens whole on every process (`prepare_context_parallel`)
    CONTEXT_PARALLEL = True
    TEXT_FORMAT = PACKED  # each prompt's tensors packed into one cached row
    audio_vae = vocoder = None

    def __init__(self, config, device):
        from .registry import compression_factors

        super().__init__(config, device)
        self.version = VERSIONS[config.model_type]
        self.fps = config.video_config.target_fps / compression_factors(config)[1]  # the frame rate clips train at
        # an IC-LoRA's control at 1/N of the clip's size: clips (and samples) are sized so that it is whole VAE cells
        self.downscale = config.reference_downscale_factor if config.in_context_control else 1
        self.spatial_multiple = type(self).spatial_multiple * self.downscale

    @classmethod
    def condition_roles(cls, config):
        # an IC-LoRA: every clip's control video (depth, pose, edges...: data/conditions.py) as in-context tokens
        return {"control": True} if config.in_context_control else {}

    @classmethod
    def condition_format(cls, config):
        # a control encoded at 1/N of the clip's size is another tensor: its cache key says so
        factor = config.reference_downscale_factor
        return f"reference_downscale_factor {factor}" if config.in_context_control and factor > 1 else ""

    def lora_metadata(self, config):
        # as Lightricks' IC-LoRA files say it, for loaders that read the factor from the file
        return {"reference_downscale_factor": str(self.downscale)} if config.in_context_control else {}

    @classmethod
    def config_problems(cls, config) -> list[str]:
        problems = super().config_problems(config)
        if config.in_context_control and config.train_audio:
            problems.append("  - in_context_control with train_audio = true: an in-context control LoRA trains the video "
                            "alone (a control video says nothing of the sound, and LTX2InContextPipeline adds no audio "
                            "condition); set train_audio to false")
        if config.training_method == "EMBEDDING" or config.additional_embeddings:
            problems.append("  - training_method EMBEDDING / additional_embeddings: the stock LTX2Pipeline has no "
                            "textual-inversion loader for its Gemma 3 encoder; train a LoRA instead")
        if config.text_encoder.train:
            problems.append("  - text_encoder.train = true: training Gemma 3 with LTX-2 is not supported; set it to false")
        if not config.video_config.use_temporal_attention:
            problems.append("  - video_config.use_temporal_attention = false: LTX-2's audio and video tokens attend "
                            "across the whole clip (audio-video cross-attention); set it to true")
        smallest = cls.SMALLEST_SAMPLE_SIDE
        for index, sample in enumerate(config.samples):
            for key in ("height", "width"):
                if getattr(sample, key) < smallest:
                    problems.append(f"  - samples[{index}].{key} = {getattr(sample, key)}: LTX-2's VAE cannot decode a side "
                                    f"under {smallest} px (two latent pixels at its {cls.spatial_multiple}x); use {smallest} "
                                    "or more")
        return problems

    # --- loading -------------------------------------------------------------------------------
    def load_transformers(self) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler, LTX2VideoTransformer3DModel

        self.scheduler = load_part(FlowMatchEulerDiscreteScheduler, self.config.base_model_name, "scheduler")
        self.transformer = self.load_transformer(LTX2VideoTransformer3DModel, "transformer", self.config.transformer)
        found = checkpoint_version(self.transformer.config)
        if found != self.config.model_type:
            where = self.config.transformer.model_name or self.config.base_model_name
            raise ModelLoadError(f"{where}: its transformer is {VERSIONS[found].name}'s, but model_type is "
                                 f"{self.config.model_type!r} ({self.version.name}). Set model_type to {found!r}, or "
                                 f"use a {self.version.name} model.")

    def load_vae(self) -> None:
        """The video VAE (in vae.weight_dtype) and the audio VAE (float32 whatever vae.weight_dtype says)."""
        from diffusers import AutoencoderKLLTX2Audio

        super().load_vae()
        if self.audio_vae is None:
            self.audio_vae = load_part(AutoencoderKLLTX2Audio, self.config.base_model_name, "audio_vae", dtype=torch.float32)
            self.audio_vae.requires_grad_(False).eval()
            found = (self.audio_vae.config.sample_rate, self.audio_vae.config.in_channels)
            if found != (self.AUDIO_SAMPLE_RATE, self.AUDIO_CHANNELS):
                raise ModelLoadError(f"{self.config.base_model_name}/audio_vae reads {found[0]} Hz, {found[1]} channels; "
                                     f"LTX-2's reads {self.AUDIO_SAMPLE_RATE} Hz stereo. Use an LTX-2 model folder.")
        self.audio_vae.to(self.device)

    def release_vae(self) -> None:
        self.audio_vae = self.vocoder = None
        super().release_vae()

    def park_vae(self) -> None:
        for module in (self.audio_vae, self.vocoder):
            if module is not None:
                module.to("cpu")
        super().park_vae()

    def load_text_encoder(self) -> None:
        import transformers
        from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors
        from transformers import AutoTokenizer

        base = self.config.base_model_name
        model = self.load_text_model(getattr(transformers, self.version.text_encoder), "text_encoder")
        self.connectors = self.load_text_model(LTX2TextConnectors, "connectors")
        self.encoders = {"gemma3": (load_part(AutoTokenizer, base, "tokenizer"), model)}

    def release_text_encoder(self) -> None:
        self.connectors = None
        super().release_text_encoder()

    # --- encoding ------------------------------------------------------------------------------
    def _encode(self, prompts: list[str]) -> torch.Tensor:
        tokenizer, gemma = self.encoders["gemma3"]
        tokenizer.padding_side = "left"  # as the pipeline sets it
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        inputs = tokenizer([p.strip() for p in prompts], padding="max_length", max_length=MAX_SEQUENCE_LENGTH,
                           truncation=True, add_special_tokens=True, return_tensors="pt").to(self.device)
        hidden = gemma(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, output_hidden_states=True).hidden_states
        stacked = torch.stack(hidden, dim=-1).flatten(2, 3).to(gemma.dtype)
        video, audio, mask = self.connectors(stacked, inputs.attention_mask, padding_side="left")
        return torch.stack([pack(video[i], audio[i], mask[i]) for i in range(len(prompts))])

    @staticmethod
    def _unpack(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N) → video embeds (B, L, Dv), audio embeds (B, L, Da), mask (B, L) as integers."""
        video, audio, mask = unpack(packed)
        return video, audio, mask.round().long()

    @no_grad
    def encode_video(self, frames: np.ndarray) -> torch.Tensor:
        pixels = self.video_pixels(frames)
        latents = self.vae_latents(pixels)
        mean = self.vae.latents_mean.view(1, -1, 1, 1, 1).to(latents)
        std = self.vae.latents_std.view(1, -1, 1, 1, 1).to(latents)
        return ((latents - mean) * self.vae.config.scaling_factor / std)[0].to("cpu")

    def audio_steps(self, frames: int, fps: float) -> int:
        """Audio latent steps for `frames` frames at `fps`: the pipeline's `audio_num_frames`."""
        return round(frames / fps * self.AUDIO_SAMPLE_RATE / self._hop / AUDIO_TEMPORAL_COMPRESSION)

    @property
    def _hop(self) -> int:
        return self.audio_vae.config.mel_hop_length if self.audio_vae is not None else 160

    def audio_latent_shape(self, frames: int, fps: float) -> tuple[int, ...]:
        width = self.transformer.config.audio_in_channels if self.transformer is not None else None
        if width is None:
            cfg = self.audio_vae.config
            width = cfg.latent_channels * (cfg.mel_bins // AUDIO_TEMPORAL_COMPRESSION)
        return (self.audio_steps(frames, fps), width)

    @no_grad
    def encode_audio(self, waveform: np.ndarray, frames: int, fps: float) -> torch.Tensor:
        cfg = self.audio_vae.config
        mel = log_mel(torch.from_numpy(waveform).float(), cfg.sample_rate, cfg.mel_hop_length, cfg.mel_bins)
        latents = self.audio_vae.encode(mel[None].to(self.device)).latent_dist.mean  # (1, C, L', M')
        packed = latents.transpose(1, 2).flatten(2, 3)[0]  # (L', C × M'): the pipeline's _pack_audio_latents
        steps = self.audio_steps(frames, fps)
        if packed.shape[0] < steps:  # the causal encoder's last step may be short of the pipeline's rounding
            packed = torch.cat([packed, packed[-1:].expand(steps - packed.shape[0], -1)])
        packed = packed[:steps]
        mean, std = self.audio_vae.latents_mean.to(packed), self.audio_vae.latents_std.to(packed)
        return ((packed - mean) / std).to("cpu")

    @no_grad
    def encode_condition(self, role: str, frames: np.ndarray, companions=None) -> torch.Tensor:
        """An IC-LoRA's control video as `LTX2InContextPipeline` encodes a reference condition: the VAE's mode,
        normalised with latents_mean / latents_std and no scaling_factor (`_normalize_latents`' default there),
        (C, F', H', W'). With `reference_downscale_factor` N, the frames are first resized to 1/N of the clip's size by
        the pipeline's own video processor (bilinear, `resize_mode="crop"`), as it preprocesses the reference."""
        pixels = self.video_pixels(frames)
        if self.downscale > 1:
            from diffusers.video_processor import VideoProcessor
            from PIL import Image

            processor = VideoProcessor(vae_scale_factor=self.spatial_multiple // self.downscale, resample="bilinear")
            height, width = frames.shape[1] // self.downscale, frames.shape[2] // self.downscale
            pixels = processor.preprocess_video([Image.fromarray(frame) for frame in frames], height, width,
                                                resize_mode="crop").to(self.device)
        latents = self.vae_latents(pixels, mode=True)
        mean = self.vae.latents_mean.view(1, -1, 1, 1, 1).to(latents)
        std = self.vae.latents_std.view(1, -1, 1, 1, 1).to(latents)
        return ((latents - mean) / std)[0].to("cpu")

    # --- training ------------------------------------------------------------------------------
    def split_conditioning(self, stored, generator, image_embeds=None, extras=None):
        """An IC-LoRA run: every clip with its control latents (the survey skips a clip without a control that fits)."""
        if not self.config.in_context_control:
            return stored, None
        return stored, Conditioning(torch.stack(extras["control"]), torch.ones(len(stored), dtype=torch.bool))

    def trained_experts(self) -> list[Expert]:
        return [Expert("transformer", "", self.transformer, (0.0, 1.0))]

    def predict(self, noisy, sigma, text, expert, conditioning=None, sound=None):
        """(video prediction, audio prediction) given `sound`; without it (memory estimates), the audio tokens are
        pure noise at σ = 1 as for a clip without sound, and only the video prediction is returned. `conditioning`
        (an IC-LoRA run): the control's latents go in as in-context tokens (`_in_context`)."""
        from diffusers import LTX2Pipeline

        model, dtype = expert.module, self.weight_dtype
        video_text, audio_text, mask = self._unpack(text.to(noisy.device, torch.float32))
        batch, _, frames, height, width = noisy.shape
        patch, patch_t = model.config.patch_size, model.config.patch_size_t
        given = sound
        if sound is None:
            shape = (batch, self.audio_steps((frames - 1) * self.temporal_factor + 1, self.fps), model.config.audio_in_channels)
            sound = Sound(torch.randn(shape, device=noisy.device), torch.ones_like(sigma))
        t, t_audio = sigma.float() * 1000.0, sound.sigma.float() * 1000.0
        hidden = LTX2Pipeline._pack_latents(noisy, patch, patch_t)
        tokens, timestep, coords = hidden.shape[1], t, None
        if conditioning is not None:  # an IC-LoRA: the control's tokens beside the clip's
            hidden, timestep, coords = self._in_context(model, noisy, hidden, t, conditioning.latents.to(noisy))
        parallel = getattr(model, "_parallel_config", None)
        if parallel is not None and parallel.context_parallel_config is not None:
            degree = self.config.context_parallel.degree
            if hidden.shape[1] % degree or video_text.shape[1] % degree:
                raise ValueError(f"context_parallel.degree = {degree}: a clip of {hidden.shape[1]} video tokens (latents "
                                 f"{tuple(noisy.shape[2:])}) and {video_text.shape[1]} prompt tokens does not split "
                                 "evenly over the processes; pick a resolution or max_frames whose token count the "
                                 "degree divides")
        video, audio = model(
            hidden_states=hidden.to(dtype), audio_hidden_states=sound.noisy.to(dtype),
            encoder_hidden_states=video_text.to(dtype), audio_encoder_hidden_states=audio_text.to(dtype), timestep=timestep,
            audio_timestep=t_audio, sigma=t, audio_sigma=t_audio, encoder_attention_mask=mask,
            audio_encoder_attention_mask=mask, num_frames=frames // patch_t, height=height // patch, width=width // patch,
            fps=self.fps, audio_num_frames=sound.noisy.shape[1], video_coords=coords,
            use_cross_timestep=self.version.cross_timestep, return_dict=False,
        )
        video = LTX2Pipeline._unpack_latents(video[:, :tokens], frames // patch_t, height // patch, width // patch, patch, patch_t)
        return video if given is None else (video, audio)

    def _in_context(self, model, noisy: torch.Tensor, hidden: torch.Tensor, t: torch.Tensor, reference: torch.Tensor):
        """The clip's packed noisy tokens (`hidden`) with the control's appended, as
        `LTX2InContextPipeline.prepare_latents` lays them out (reference tokens last): (tokens, per-token timesteps,
        positions). The pipeline gives each token t·(1 - strength): 0 for the clean reference at strength 1; and
        places each on its own latent grid at the video's frame rate (the same positions, when the control is the
        clip's size and length), a downscaled control's spatial positions times `reference_downscale_factor`."""
        from diffusers import LTX2Pipeline

        packed = LTX2Pipeline._pack_latents(reference, model.config.patch_size, model.config.patch_size_t)
        batch = len(noisy)
        timestep = torch.cat([t[:, None].expand(-1, hidden.shape[1]), t.new_zeros(batch, packed.shape[1])], dim=1)

        def positions(latents):
            _, _, frames, height, width = latents.shape
            return model.rope.prepare_video_coords(batch, frames, height, width, latents.device, fps=self.fps)

        control = positions(reference)
        if self.downscale != 1:  # on the clip's grid: height and width (axes 1, 2) scaled, time not
            control[:, 1:3] = control[:, 1:3] * self.downscale
        return torch.cat([hidden, packed], dim=1), timestep, torch.cat([positions(noisy), control], dim=2)

    # --- context parallel ----------------------------------------------------------------------
    def context_parallel_plan(self, module):
        """diffusers' `_cp_plan` for the LTX-2 transformer, corrected: the video tokens, the video prompt and its mask
        are split where diffusers splits them and the video output gathered at `proj_out`, but the video positions
        are split where they are used: `rope`'s (cos, sin) hold the tokens at dim 2 for `rope_type: split` (every
        released checkpoint; diffusers' entry expects dim 1 of a 3-d tensor, skips the 4-d one and the attention
        fails on the shapes), and `cross_attn_rope`'s (the video queries of the audio-to-video attention) are split
        too. The audio stays whole (`prepare_context_parallel`)."""
        from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

        if module.config.rope_type == "split":  # (B, heads, tokens, dim / 2)
            rope = ContextParallelInput(split_dim=2, expected_dims=4, split_output=True)
        else:  # interleaved: (B, tokens, dim)
            rope = ContextParallelInput(split_dim=1, expected_dims=3, split_output=True)
        return {
            "": {"hidden_states": ContextParallelInput(split_dim=1, expected_dims=3, split_output=False),
                 "encoder_hidden_states": ContextParallelInput(split_dim=1, expected_dims=3, split_output=False),
                 "encoder_attention_mask": ContextParallelInput(split_dim=1, expected_dims=2, split_output=False)},
            "rope": {0: rope, 1: rope},
            "cross_attn_rope": {0: rope, 1: rope},
            "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
        }

    def prepare_context_parallel(self, module, degree: int) -> None:
        """The audio tokens stay whole on every process of a context group. They are few (a 5 s clip has 126, its
        video at 720p thousands) and their count is set by the clip's duration, which a degree need not divide.
        Diffusers' Ulysses attention gives each process the whole audio sequence once per process, so the audio
        attentions see every audio key repeated `degree` times, which leaves a softmax unchanged: the forward is
        exact. Every process then computes the same audio loss and back-propagates it whole, so the summed gradient
        would count the audio loss `degree` times: the audio output's gradient is divided by `degree` (the video's
        needs nothing: its gather hands each process only its own tokens' gradient). Beside the plan: a prompt mask
        of ones is dropped (exact; the masks Ulysses would gather carry every head and do not fit the processes'
        share of them), per-token video inputs are split like the tokens."""
        from ..config import ConfigError

        heads = module.config.audio_num_attention_heads
        if heads % degree:
            raise ConfigError(f"context_parallel.degree = {degree} with ulysses attention: LTX-2's audio stream has "
                              f"{heads} attention heads, which must split evenly over the processes; pick a degree "
                              f"dividing {heads}")
        module.register_forward_pre_hook(_context_parallel_inputs, with_kwargs=True)
        module.audio_proj_out.register_forward_hook(
            lambda _module, _inputs, output: _DividedGradient.apply(output, degree))

    def fsdp_units(self, module):
        return list(module.transformer_blocks)

    def lora_may_adapt(self, name: str) -> bool:
        return name.startswith("transformer_blocks.") and self.may_train(name)

    def may_train(self, name: str) -> bool:
        """train_audio false: nothing whose name says audio trains (the audio stream's attention, feed-forward,
        embedders and both cross-modal attentions), so the LoRA has no audio keys and the audio branch is as it was."""
        return self.config.train_audio or "audio" not in name

    def lora_default_target(self, name: str) -> bool:
        return name.endswith(_DEFAULT_TARGETS)

    def save_diffusers_lora(self, directory, weight_name, state_dict, adapter_metadata):
        from diffusers import LTX2Pipeline

        LTX2Pipeline.save_lora_weights(directory, transformer_lora_layers=state_dict, weight_name=weight_name,
                                       transformer_lora_adapter_metadata=adapter_metadata)

    def single_file_state_dict(self, module, dtype, state=None) -> dict:
        """The transformer's weights named as the original LTX-2 checkpoints (ComfyUI's): what diffusers' single-file
        converter renames back. Only the embedders, modulations, norms' and cross-modal tables' names differ.
        ComfyUI's LTX-2 model also holds the video and audio text connectors (diffusers keeps them in the pipeline's
        `connectors`): they are written too, from the base model (they are frozen), or ComfyUI would run with
        uninitialised ones; diffusers' converter drops them when it reads the file."""
        state = module.state_dict() if state is None else state
        weights = {original_name(k): v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}
        return weights | self._connector_weights(dtype)

    def _frozen_connectors(self):
        from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors

        return getattr(self, "connectors", None) or load_part(
            LTX2TextConnectors, self.config.base_model_name, "connectors", dtype=torch.float32)

    def _connector_weights(self, dtype) -> dict:
        return {original_connector_name(k): v.detach().to("cpu", dtype).contiguous()
                for k, v in self._frozen_connectors().state_dict().items()
                if k.startswith(("video_connector.", "audio_connector."))}

    def single_file_metadata(self, module) -> dict[str, str] | None:
        """ComfyUI builds an LTX model from the options in the file's `config` metadata, as the released checkpoints
        carry them (its detection reads only the depth and the widths from the weights): without them it builds
        LTX-2.0's blocks, which a 2.3 file's modulation tables do not fit. LTX-2.0 needs none."""
        cfg = module.config
        if not cfg.get("cross_attn_mod", False):
            return None
        options = {"apply_gated_attention": bool(cfg.get("gated_attn", False)),
                   "cross_attention_adaln": bool(cfg.cross_attn_mod),
                   # 2.3 on: the connectors project the text per modality, the transformer has no caption projection
                   "caption_proj_before_connector": not cfg.get("use_prompt_embeddings", True),
                   "caption_projection_first_linear": False,
                   "connector_apply_gated_attention": bool(self._frozen_connectors().config.get("video_gated_attn", False))}
        return {"config": json.dumps({"transformer": options})}

    def comfy_lora_key(self, peft_module_name: str) -> str:
        """Inside the blocks (the only place a LoRA adapts), the original LTX-2 names are diffusers' own."""
        return f"diffusion_model.{peft_module_name}"

    def comfy_lora_keeps_alpha(self, peft_module_name: str) -> bool:
        """diffusers' LTX-2 reader renames original-layout keys and hands them to peft, which has no use for `.alpha`;
        alpha / rank goes into lora_B (ComfyUI then applies the file at scale 1, the same weights)."""
        return False

    # --- sampling ------------------------------------------------------------------------------
    @no_grad
    def sample(self, request: SampleRequest):
        from diffusers import LTX2Pipeline
        from diffusers.pipelines.ltx2 import vocoder as vocoders

        self.load_vae()
        if self.vocoder is None:
            vocoder_class = getattr(vocoders, self.version.vocoder)
            self.vocoder = load_part(vocoder_class, self.config.base_model_name, "vocoder", dtype=torch.float32).eval()
        self.vocoder.to(self.device)
        dtype = self.weight_dtype
        video, audio, mask = self._unpack(request.prompt_embeds.to(self.device, torch.float32))
        inputs = dict(prompt_embeds=video.to(dtype), prompt_attention_mask=mask)
        given = _given_text()(audio.to(dtype))
        guidance = 1.0
        if request.negative_prompt_embeds is not None:
            negative, negative_audio, negative_mask = self._unpack(request.negative_prompt_embeds.to(self.device, torch.float32))
            inputs.update(negative_prompt_embeds=negative.to(dtype), negative_prompt_attention_mask=negative_mask)
            given = _given_text()(torch.cat([negative_audio, audio]).to(dtype))  # the pipeline batches negative first
            guidance = request.cfg_scale
        pipeline_class = LTX2Pipeline
        if self.config.in_context_control:  # an IC-LoRA follows the sample's control video, as at inference
            from diffusers import LTX2InContextPipeline
            from diffusers.pipelines.ltx2.pipeline_ltx2_ic_lora import LTX2ReferenceCondition
            from PIL import Image

            pipeline_class = LTX2InContextPipeline
            control = [Image.fromarray(frame) for frame in request.control]  # resized by the pipeline to the sample's size
            inputs["reference_conditions"] = [LTX2ReferenceCondition(frames=control, strength=1.0)]
            inputs["reference_downscale_factor"] = self.downscale
        pipeline = pipeline_class(scheduler=self.scheduler, vae=self.vae, audio_vae=self.audio_vae, text_encoder=None,
                                  tokenizer=None, connectors=given, transformer=self.transformer, vocoder=self.vocoder)
        pipeline.set_progress_bar_config(disable=True)
        try:
            frames, sound = pipeline(
                **inputs, height=request.height, width=request.width, num_frames=request.frames,
                frame_rate=request.fps or self.fps, num_inference_steps=request.steps, guidance_scale=guidance,
                audio_guidance_scale=guidance, stg_scale=0.0, audio_stg_scale=0.0, modality_scale=1.0,
                audio_modality_scale=1.0, use_cross_timestep=self.version.cross_timestep,
                generator=torch.Generator(device=self.device).manual_seed(request.seed), output_type="np",
                return_dict=False,
            )
        finally:
            self.park_vae()
        video_frames = to_uint8(frames[0])
        return video_frames, sound[0].float().cpu().numpy(), self.vocoder.config.output_sampling_rate

    # --- tiny models (motiontune.testing) --------------------------------------------------------------
    @classmethod
    def tiny_pipeline(cls, name, tokenizer, clips, heads, layers):
        """An LTX checkpoint's layout, tiny: its Gemma (3 with its vision tower, as released; 4 for LTX-2.5) read at
        every layer, the text connectors (one shared projection in 2.0; per modality, gated, in 2.3 on), the 32x/8x
        video VAE (128 → 16 latent channels; 2.3 on has a four-stage decoder), the audio VAE on 16 kHz stereo log-mels
        (16 mel bins here), the vocoder (with 2.3's bandwidth extension to 48 kHz) and the joint audio-video
        transformer (2.3 on: gated attention, prompt cross-attention modulated by σ; 2.5: no video feed-forward bias,
        a keyframe position embedding). Latent statistics are measured on the bundled clips (video) and on tones and
        noise (audio)."""
        from diffusers import (AutoencoderKLLTX2Audio, AutoencoderKLLTX2Video, FlowMatchEulerDiscreteScheduler,
                               LTX2Pipeline, LTX2VideoTransformer3DModel)
        from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors
        from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder, LTX2VocoderWithBWE

        later = name != "ltx-2"  # 2.3 and 2.5
        width, audio_width = 32, 16
        gemma = _tiny_gemma(name == "ltx-2.5", width)
        modality = dict(video_gated_attn=True, audio_gated_attn=True, per_modality_projections=True, video_hidden_dim=32,
                        audio_hidden_dim=32, proj_bias=True) if later else {}
        connectors = LTX2TextConnectors(
            caption_channels=width, text_proj_in_factor=3, video_connector_num_attention_heads=2,
            video_connector_attention_head_dim=16, video_connector_num_layers=1, video_connector_num_learnable_registers=8,
            audio_connector_num_attention_heads=2, audio_connector_attention_head_dim=16, audio_connector_num_layers=1,
            audio_connector_num_learnable_registers=8, rope_type="split", **modality)
        if later:
            vae = AutoencoderKLLTX2Video(
                latent_channels=16, block_out_channels=(8, 16, 32, 32), decoder_block_out_channels=(8, 16, 16, 32),
                layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1),
                decoder_spatio_temporal_scaling=(True,) * 4, decoder_inject_noise=(False,) * 5,
                upsample_type=("spatiotemporal", "spatiotemporal", "temporal", "spatial"), upsample_residual=(False,) * 4,
                upsample_factor=(2, 2, 1, 2), decoder_causal=False, decoder_spatial_padding_mode="zeros",
                spatial_compression_ratio=32, temporal_compression_ratio=8).eval()
        else:
            vae = AutoencoderKLLTX2Video(latent_channels=16, block_out_channels=(8, 16, 32, 64), decoder_block_out_channels=(8, 16, 32),
                                         layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1),
                                         decoder_causal=False, spatial_compression_ratio=32, temporal_compression_ratio=8).eval()
        audio_vae = AutoencoderKLLTX2Audio(base_channels=audio_width, latent_channels=4, mel_bins=16, num_res_blocks=1).eval()
        with torch.no_grad():  # per-channel statistics of the VAEs' own encodings, as the released ones were measured
            latents = torch.cat([vae.encode(clip).latent_dist.mean for clip in clips])
            vae.latents_mean.copy_(latents.mean(dim=(0, 2, 3, 4)))
            vae.latents_std.copy_(latents.std(dim=(0, 2, 3, 4)))
            sounds = [np.sin(2 * np.pi * hz * np.arange(16000) / 16000) * 0.5 for hz in (220, 440, 880)]
            sounds.append(np.random.default_rng(0).normal(0, 0.1, 16000))
            mels = [log_mel(torch.tensor(np.stack([s, s]), dtype=torch.float32), 16000, 160, 16) for s in sounds]
            packed = torch.cat([audio_vae.encode(m[None]).latent_dist.mean.transpose(1, 2).flatten(2, 3)[0] for m in mels])
            audio_vae.latents_mean.copy_(packed.mean(0))
            audio_vae.latents_std.copy_(packed.std(0))
        newer = dict(gated_attn=True, cross_attn_mod=True, audio_gated_attn=True, audio_cross_attn_mod=True,
                     use_prompt_embeddings=False, perturbed_attn=True) if later else {}
        if name == "ltx-2.5":
            newer.update(ff_bias=False, use_keyframes_abs_pos_embedding=True)
        transformer = LTX2VideoTransformer3DModel(
            in_channels=16, out_channels=16, num_attention_heads=heads or 2, attention_head_dim=16, cross_attention_dim=32,
            audio_in_channels=audio_width, audio_out_channels=audio_width, audio_num_attention_heads=2,
            audio_attention_head_dim=16, audio_cross_attention_dim=32, num_layers=layers, caption_channels=width,
            rope_type="split", **newer)
        if later:
            vocoder = LTX2VocoderWithBWE(
                in_channels=2 * 16, hidden_channels=64, upsample_kernel_sizes=[11, 4, 4, 4, 4, 4], upsample_factors=[5, 2, 2, 2, 2, 2],
                resnet_kernel_sizes=[3], resnet_dilations=[[1]], bwe_in_channels=2 * 16, bwe_hidden_channels=32,
                bwe_upsample_kernel_sizes=[12, 11, 4, 4, 4], bwe_upsample_factors=[6, 5, 2, 2, 2], bwe_resnet_kernel_sizes=[3],
                bwe_resnet_dilations=[[1]], num_mel_channels=16)
        else:
            vocoder = LTX2Vocoder(in_channels=2 * 16, hidden_channels=16, upsample_kernel_sizes=[12, 10, 16],
                                  upsample_factors=[6, 5, 8], resnet_kernel_sizes=[3], resnet_dilations=[[1]])
        scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05,
                                                    base_image_seq_len=1024, max_image_seq_len=4096, shift_terminal=0.1)
        # Gemma's tokenizers pad on the left (transformers' GemmaTokenizer); LTX2InContextPipeline reads the side from
        # the tokenizer when it is built and hands it to the connectors
        gemma_tokenizer = tokenizer("tokenizer", MAX_SEQUENCE_LENGTH, padding_side="left")
        return LTX2Pipeline(scheduler=scheduler, vae=vae, audio_vae=audio_vae, text_encoder=gemma,
                            tokenizer=gemma_tokenizer, connectors=connectors,
                            transformer=transformer, vocoder=vocoder)

    # --- what estimate needs to know (motiontune/estimate asks; nothing here loads weights) ----------------------
    transformer_class_name = "LTX2VideoTransformer3DModel"
    block_groups = (("num_layers", "transformer_blocks"),)
    text_tokens = MAX_SEQUENCE_LENGTH

    def estimate_release(self, base: str) -> tuple[str, dict[str, dict]]:
        """(Hub id, its parts' configs): `base` when it is a released model, else this model type's release."""
        name = base if base in RELEASES else DEFAULT_RELEASE[self.config.model_type]
        return name, RELEASES[name]

    def _estimate_text(self, batch: int, cfg: dict) -> torch.Tensor:
        """Cached rows as the connectors make them: video and audio embeddings as wide as the transformer takes them
        (2.0: the caption width for both; 2.3 on: the video and audio cross-attention widths)."""
        video, audio = _text_widths(cfg)
        row = pack(torch.zeros(MAX_SEQUENCE_LENGTH, video), torch.zeros(MAX_SEQUENCE_LENGTH, audio), torch.ones(MAX_SEQUENCE_LENGTH))
        return row.expand(batch, -1).clone()

    def estimate_step_inputs(self, cfg: dict, x0: torch.Tensor, dtype: torch.dtype):
        """(cached text rows, the control's latents in an IC-LoRA run); `predict` adds the clip's audio tokens (noise,
        as for a clip without sound: the same tensors, without the audio loss's few bytes)."""
        control = None
        if self.config.in_context_control:  # as many control tokens again as the clip has (N² times fewer: downscaled)
            batch, channels, frames, height, width = x0.shape
            control = Conditioning(x0.new_zeros(batch, channels, frames, height // self.downscale, width // self.downscale),
                                   torch.ones(len(x0), dtype=torch.bool))
        return self._estimate_text(len(x0), cfg), control

    def estimate_sample_call(self, cfg: dict, latent: tuple[int, int, int], dtype: torch.dtype) -> dict:
        """One transformer call as the stock pipeline makes it while sampling (batch 1, guidance off)."""
        f, h, w = latent
        video, audio = _text_widths(cfg)
        steps = self.audio_steps((f - 1) * self.temporal_factor + 1, self.fps)
        tokens = f * h * w
        call = {"hidden_states": torch.empty(1, tokens, cfg["in_channels"], dtype=dtype),
                "audio_hidden_states": torch.empty(1, steps, cfg.get("audio_in_channels", 128), dtype=dtype),
                "encoder_hidden_states": torch.empty(1, MAX_SEQUENCE_LENGTH, video, dtype=dtype),
                "audio_encoder_hidden_states": torch.empty(1, MAX_SEQUENCE_LENGTH, audio, dtype=dtype),
                "timestep": torch.empty(1), "sigma": torch.empty(1), "encoder_attention_mask": torch.ones(1, MAX_SEQUENCE_LENGTH),
                "audio_encoder_attention_mask": torch.ones(1, MAX_SEQUENCE_LENGTH), "num_frames": f, "height": h,
                "width": w, "fps": self.fps, "audio_num_frames": steps}
        if self.config.in_context_control:  # an IC-LoRA: the control's tokens too, with a timestep and position each
            tokens += f * (h // self.downscale) * (w // self.downscale)
            call.update(hidden_states=torch.empty(1, tokens, cfg["in_channels"], dtype=dtype),
                        timestep=torch.empty(1, tokens), video_coords=torch.zeros(1, 3, tokens, 2))
        return call

    def estimate_text_encoders(self, configs: dict[str, dict]) -> list[tuple[str, torch.nn.Module]]:
        import transformers
        from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors

        from .fake_memory import init_kwargs

        gemma = getattr(transformers, self.version.text_encoder)
        name = "Gemma 4" if "Gemma4" in self.version.text_encoder else "Gemma 3"
        with torch.device("meta"):
            return [(name, gemma(gemma.config_class(**configs["text_encoder"]))),
                    ("connectors", LTX2TextConnectors(**init_kwargs(configs["connectors"], LTX2TextConnectors)))]


# --- the released models' configs, for `motiontune estimate` on a Hub id not on this machine (sources in the file) --
_RELEASE_DATA = json.loads((Path(__file__).parent / "releases" / "ltx2.json").read_text())
RELEASES, DEFAULT_RELEASE = _RELEASE_DATA["releases"], _RELEASE_DATA["default_release"]
RELEASE = RELEASES["Lightricks/LTX-2"]

# diffusers name → original (ltx-core / ComfyUI) name, in the order they apply (diffusers' converter in reverse)
_TO_ORIGINAL = (("audio_proj_in", "audio_patchify_proj"), ("proj_in", "patchify_proj"),
                ("av_cross_attn_video_scale_shift", "av_ca_video_scale_shift_adaln_single"),
                ("av_cross_attn_video_a2v_gate", "av_ca_a2v_gate_adaln_single"),
                ("av_cross_attn_audio_scale_shift", "av_ca_audio_scale_shift_adaln_single"),
                ("av_cross_attn_audio_v2a_gate", "av_ca_v2a_gate_adaln_single"),
                ("video_a2v_cross_attn_scale_shift_table", "scale_shift_table_a2v_ca_video"),
                ("audio_a2v_cross_attn_scale_shift_table", "scale_shift_table_a2v_ca_audio"),
                ("norm_q", "q_norm"), ("norm_k", "k_norm"), ("audio_prompt_adaln", "audio_prompt_adaln_single"))


def _context_parallel_inputs(module, args, kwargs):
    """Before the plan's split (a context-parallel LTX-2 transformer): prompt masks of ones dropped (exact: they add
    0 to every score) and refused otherwise; per-token video inputs (timesteps of in-context tokens, the keyframe
    marker) split like the video tokens."""
    import torch.distributed as dist

    for name in ("encoder_attention_mask", "audio_encoder_attention_mask"):
        mask = kwargs.get(name)
        if mask is not None:
            if mask.dim() != 2 or not bool((mask == 1).all()):
                raise ValueError(f"context_parallel with an LTX-2 prompt whose {name} masks tokens out: diffusers' "
                                 "Ulysses attention cannot split such a mask (the released text connectors fill the "
                                 "padding with learned registers, so their masks are all ones); set "
                                 "context_parallel.degree to 1")
            kwargs[name] = None
    if kwargs.get("video_self_attention_mask") is not None:
        raise ValueError("context_parallel with an LTX-2 video self-attention mask: not split by the plan; set "
                         "context_parallel.degree to 1")
    mesh = module._parallel_config.context_parallel_config._flattened_mesh
    group = mesh.get_group()
    for name, dims in (("timestep", 2), ("video_keyframes_mask", 3)):
        value = kwargs.get(name)
        if value is not None and value.dim() == dims:
            kwargs[name] = value.chunk(mesh.size(), dim=1)[dist.get_rank(group)]
    return args, kwargs


def _divided_gradient():
    class DividedGradient(torch.autograd.Function):
        """The identity forward; the gradient divided by `degree` backward."""

        @staticmethod
        def forward(ctx, tensor, degree):
            ctx.degree = degree
            return tensor.view_as(tensor)

        @staticmethod
        def backward(ctx, grad):
            return grad / ctx.degree, None

    return DividedGradient


class _DividedGradientProxy:
    """`_DividedGradient.apply`: the autograd function is made on first use (torch is imported lazily here)."""

    @functools.cached_property
    def _function(self):
        return _divided_gradient()

    def apply(self, tensor, degree):
        return self._function.apply(tensor, degree)


_DividedGradient = _DividedGradientProxy()


def original_name(name: str) -> str:
    """A diffusers LTX2VideoTransformer3DModel key → its original LTX-2 name."""
    for ours, theirs in _TO_ORIGINAL:
        if ours in name and theirs not in name:
            name = name.replace(ours, theirs)
    if name.startswith("time_embed."):
        name = "adaln_single." + name.removeprefix("time_embed.")
    elif name.startswith("audio_time_embed."):
        name = "audio_adaln_single." + name.removeprefix("audio_time_embed.")
    elif name.startswith("prompt_adaln."):
        name = "prompt_adaln_single." + name.removeprefix("prompt_adaln.")
    return name


def original_connector_name(name: str) -> str:
    """A diffusers LTX2TextConnectors key of a connector → its name in the original LTX-2 transformer (ComfyUI's);
    the text projection before them (`text_proj_in`) is the text encoder's there, not the transformer's."""
    modality, rest = name.split("_connector.", 1)
    return f"{modality}_embeddings_connector." + original_name(rest.replace("transformer_blocks.", "transformer_1d_blocks."))


def _text_widths(transformer_config: dict) -> tuple[int, int]:
    """The widths of the cached video and audio text embeddings: the caption width for both in 2.0 (the transformer
    projects them), the video and audio cross-attention widths from 2.3 on (the connectors project them)."""
    if transformer_config.get("use_prompt_embeddings", True):
        return (transformer_config.get("caption_channels", 3840),) * 2
    return transformer_config["cross_attention_dim"], transformer_config["audio_cross_attention_dim"]


def _tiny_gemma(gemma4: bool, width: int):
    """A tiny Gemma 3 (with its vision tower, as LTX-2 and 2.3 use it) or Gemma 4 (LTX-2.5's, text only)."""
    text = dict(vocab_size=256, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, max_position_embeddings=2048, sliding_window=256, pad_token_id=0,
                eos_token_id=1, bos_token_id=1)
    if gemma4:
        from transformers import Gemma4UnifiedConfig, Gemma4UnifiedForConditionalGeneration

        return Gemma4UnifiedForConditionalGeneration(Gemma4UnifiedConfig(
            text_config=dict(text, global_head_dim=16), vision_config=None, audio_config=None)).eval()
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    return Gemma3ForConditionalGeneration(Gemma3Config(
        text_config=dict(text, query_pre_attn_scalar=16),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        mm_tokens_per_image=4, boi_token_index=253, eoi_token_index=254, image_token_index=255)).eval()


@functools.cache
def _given_text() -> type:
    """Stands in for the pipeline's text connectors while sampling: the prompts' cached connector outputs go in as
    `prompt_embeds` (video) and here (audio), so the frozen Gemma 3 and connectors need not be loaded again. (The
    module's class is made on first use: its base is torch's, which `motiontune inspect` does not import.)"""

    class GivenText(torch.nn.Module):
        def __init__(self, audio: torch.Tensor):
            super().__init__()
            self.audio = audio

        @property
        def device(self) -> torch.device:  # what the pipeline asks of each of its parts
            return self.audio.device

        @property
        def dtype(self) -> torch.dtype:
            return self.audio.dtype

        def forward(self, video, mask, padding_side="left"):
            return video, self.audio.to(video.device, video.dtype), mask

    return GivenText


def log_mel(waveform: torch.Tensor, rate: int, hop: int, bins: int) -> torch.Tensor:
    """(channels, samples) → (channels, frames, bins): the log-mel spectrogram the audio VAE reads, as ltx-core's
    AudioProcessor computes it (torchaudio's MelSpectrogram with these settings)."""
    from transformers.audio_utils import mel_filter_bank

    spectrum = torch.stft(waveform, N_FFT, hop_length=hop, win_length=N_FFT, window=torch.hann_window(N_FFT),
                          center=True, pad_mode="reflect", return_complex=True).abs()  # (channels, freqs, frames)
    bank = mel_filter_bank(num_frequency_bins=N_FFT // 2 + 1, num_mel_filters=bins, min_frequency=0.0,
                           max_frequency=rate / 2, sampling_rate=rate, norm="slaney", mel_scale="slaney")
    mel = torch.einsum("cft,fm->ctm", spectrum, torch.from_numpy(bank).float())
    return torch.log(mel.clamp(min=1e-5))
