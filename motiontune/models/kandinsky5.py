"""Kandinsky 5 video (Lite 2B and Pro 19B; text-to-video and image-to-video), as the stock `Kandinsky5T2VPipeline`
and `Kandinsky5I2VPipeline` run it.

- Prompts: the pipeline's own `encode_prompt`, one prompt at a time (the transformer has no text mask: the pipeline
  samples a prompt alone, unpadded). Qwen2.5-VL reads the pipeline's template around the prompt, the first 128
  tokens are cropped and the last hidden states kept (up to 512 tokens); CLIP ViT-L gives the pooled vector.
- Latents: the HunyuanVideo VAE's mean × `scaling_factor` (8x spatial, 4x temporal, 16 channels); frames 4n+1;
  the transformer reads them channels-last in 2x2 patches, so sizes are multiples of 16.
- The transformer's input is 2C+1 channels (`visual_cond`): the latents, condition latents and a mask. The pipeline
  always passes zero condition latents; text-to-video a zero mask. Image-to-video puts the first frame's clean
  latents in place of the noisy first latent frame (same timestep), marks that frame 1 in the mask and never updates
  it: training does the same and leaves that frame out of the loss.
- Flow: t = σ × the scheduler's `num_train_timesteps` (1000), target noise − x0; the released schedulers shift by
  10 (5 for Pro image-to-video at high resolution). RoPE is scaled by the pipeline's `_get_scale_factor` of the
  pixel size, and the 10 s / Pro high-resolution checkpoints use the pipeline's sparse (nabla) attention: both are
  passed as the pipeline passes them.

One cached tensor per prompt (models/packing.py): [Qwen embeds padded to 512 tokens, their length, CLIP pooled].
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

from ..util.lazy import no_grad, np, torch
from .base import Conditioning, Expert, ModelFamily, SampleRequest, calibrate_scaling_factor, to_uint8
from .loading import load_part
from .packing import FORMAT as PACKED, pack, unpack

MODEL_TYPES = ("KANDINSKY_5_T2V", "KANDINSKY_5_I2V")
MAX_SEQUENCE_LENGTH = 512  # the pipeline's default: Qwen tokens kept after the template's crop

_DEFAULT_TARGETS = re.compile(r"^(text|visual)_transformer_blocks\.\d+\.((self|cross)_attention\.(to_query|to_key|to_value|out_layer)"
                              r"|feed_forward\.(in_layer|out_layer))$")


class Kandinsky5Family(ModelFamily):
    MODEL_TYPES = MODEL_TYPES
    NAME = "Kandinsky 5"
    TINY_MODELS = ("kandinsky-5", "kandinsky-5-i2v")
    VAE_CLASS = "AutoencoderKLHunyuanVideo"
    VAE_COMPRESSION = (8, 4)
    QUANTIZED_TEXT_ENCODER = True  # Qwen2.5-VL-7B is ~15 GB in bf16
    temporal_factor = 4
    spatial_multiple = 16  # the VAE's 8x times the transformer's 2x2 patches (the pipeline asks for 16)
    ENCODER_PARTS = {"vae": ("vae",), "text": ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")}
    TEXT_FORMAT = PACKED

    @classmethod
    def first_frame(cls, model_type):
        return "required" if model_type == "KANDINSKY_5_I2V" else None

    @classmethod
    def config_problems(cls, config):
        problems = super().config_problems(config)
        if not config.video_config.use_temporal_attention:
            problems.append(f"  - video_config.use_temporal_attention = false: {config.model_type}'s self-attention runs "
                            "over all video tokens at once; frame-local attention is built for WAN only. Remove the key")
        return problems

    #: t = σ × this: the scheduler's num_train_timesteps (read when it loads; diffusers' default until then)
    timestep_scale = 1000

    def __init__(self, config, device):
        super().__init__(config, device)
        self.is_i2v = self.first_frame(config.model_type) == "required"

    @property
    def _pipeline_class(self):
        from diffusers import Kandinsky5I2VPipeline, Kandinsky5T2VPipeline

        return Kandinsky5I2VPipeline if self.is_i2v else Kandinsky5T2VPipeline

    # --- loading -------------------------------------------------------------------------------
    def load_transformers(self) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler, Kandinsky5Transformer3DModel

        self.scheduler = load_part(FlowMatchEulerDiscreteScheduler, self.config.base_model_name, "scheduler")
        self.timestep_scale = self.scheduler.config.num_train_timesteps
        self.transformer = self.load_transformer(Kandinsky5Transformer3DModel, "transformer", self.config.transformer)

    def load_text_encoder(self) -> None:
        from transformers import AutoTokenizer, CLIPTextModel, Qwen2_5_VLForConditionalGeneration

        base = self.config.base_model_name
        # The release's `tokenizer` folder is a Qwen2VLProcessor; for text alone it is its tokenizer (which loads
        # without the processor's torchvision). Keys: ComfyUI's names for these encoders.
        self.encoders = {
            "qwen25_7b": (load_part(AutoTokenizer, base, "tokenizer"),
                          self.load_text_model(Qwen2_5_VLForConditionalGeneration, "text_encoder", quantize="model")),
            "clip_l": (load_part(AutoTokenizer, base, "tokenizer_2"), self.load_text_model(CLIPTextModel, "text_encoder_2")),
        }

    # --- encoding ------------------------------------------------------------------------------
    def _encode(self, prompts: list[str]) -> torch.Tensor:
        """Each prompt through the pipeline's own `encode_prompt` (template, crop, truncation, CLIP pooling)."""
        (tokenizer, qwen), (clip_tokenizer, clip) = self.encoders["qwen25_7b"], self.encoders["clip_l"]
        pipeline = self._pipeline_class(transformer=None, vae=None, text_encoder=qwen, tokenizer=tokenizer,
                                        text_encoder_2=clip, tokenizer_2=clip_tokenizer, scheduler=None)
        rows = []
        for prompt in prompts:
            embeds, pooled, _ = pipeline.encode_prompt(prompt, max_sequence_length=MAX_SEQUENCE_LENGTH, device=self.device,
                                                       dtype=self.text_dtype)
            length = embeds.shape[1]
            padded = torch.nn.functional.pad(embeds[0], (0, 0, 0, MAX_SEQUENCE_LENGTH - length))
            rows.append(pack(padded, torch.tensor([float(length)], device=self.device), pooled[0]))
        return torch.stack(rows)

    @staticmethod
    def _unpack(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N) → Qwen embeds (B, 512, D), each prompt's token count (B,), CLIP pooled (B, P)."""
        embeds, length, pooled = unpack(packed)
        return embeds, length[:, 0].round().long(), pooled

    def _scaled_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vae_latents(pixels) * self.vae.config.scaling_factor

    @no_grad
    def encode_video(self, frames: np.ndarray) -> torch.Tensor:
        """Image-to-video: + the first frame's own latents (the pipeline encodes the image alone; the VAE's group norms
        see every frame of a clip, so a clip's first latent frame differs from them) as a first latent frame of C
        more channels, zeros elsewhere."""
        pixels = self.video_pixels(frames)
        latents = self._scaled_latents(pixels)
        if self.is_i2v:
            first = torch.zeros_like(latents)
            first[:, :, :1] = self._scaled_latents(pixels[:, :, :1])
            latents = torch.cat([latents, first], dim=1)
        return latents[0].to("cpu")

    def split_conditioning(self, stored, generator, image_embeds=None, extras=None):
        """Image-to-video: the clean first latent frame is given and left out of the loss."""
        if not self.is_i2v:
            return stored, None
        channels = stored.shape[1] // 2
        loss_frames = torch.ones(stored.shape[0], stored.shape[2])
        loss_frames[:, 0] = 0
        return stored[:, :channels], Conditioning(stored[:, channels:, :1], torch.ones(len(stored), dtype=torch.bool),
                                                  loss_frames)

    # --- training ------------------------------------------------------------------------------
    def trained_experts(self) -> list[Expert]:
        return [Expert("transformer", "", self.transformer, (0.0, 1.0))]

    @staticmethod
    def _transformer_input(module, latents: torch.Tensor, given_first_frame: bool) -> torch.Tensor:
        """(B, C, F, H, W) → the pipeline's channels-last input: the latents, then (visual_cond) zero condition latents
        and the mask (1 on a given first frame)."""
        hidden = latents.permute(0, 2, 3, 4, 1)
        if not module.config.visual_cond:
            return hidden
        mask = torch.zeros_like(hidden[..., :1])
        if given_first_frame:
            mask[:, :1] = 1
        return torch.cat([hidden, torch.zeros_like(hidden), mask], dim=-1)

    def _positions(self, module, hidden: torch.Tensor) -> dict:
        """The rope positions, rope scale and sparse-attention parameters the pipeline computes for latents `hidden`
        (B, F, H, W, C)."""
        _, frames, height, width, _ = hidden.shape
        spatial = self.vae_compression(self.config.model_type)[0]
        pipeline = self._pipeline_class
        holder = SimpleNamespace(transformer=module, fast_sta_nabla=pipeline.fast_sta_nabla)
        return {"visual_rope_pos": [torch.arange(frames, device=hidden.device), torch.arange(height // 2, device=hidden.device),
                                    torch.arange(width // 2, device=hidden.device)],
                "scale_factor": pipeline._get_scale_factor(None, height * spatial, width * spatial),
                "sparse_params": pipeline.get_sparse_params(holder, hidden, hidden.device)}

    def predict(self, noisy, sigma, text, expert, conditioning=None):
        """Prompts of different lengths go through the transformer in separate calls: it has no text mask, so padding
        would change the prediction (the pipeline encodes and samples each prompt alone)."""
        embeds, lengths, pooled = self._unpack(text.to(noisy.device, torch.float32))
        if conditioning is not None:  # image-to-video: the clean first frame in place of the noisy one
            noisy = torch.cat([conditioning.latents.to(noisy.device, noisy.dtype), noisy[:, :, 1:]], dim=2)
        dtype, module = self.weight_dtype, expert.module
        hidden = self._transformer_input(module, noisy, conditioning is not None).to(dtype)
        timestep = (sigma * self.timestep_scale).to(dtype)
        positions = self._positions(module, hidden)
        groups: dict[int, list[int]] = {}  # prompt length → its rows (grouped in Python: no data-dependent tensor ops)
        for row, length in enumerate(lengths.tolist()):
            groups.setdefault(length, []).append(row)
        outputs = []
        for length, rows in groups.items():
            rows = torch.tensor(rows, device=noisy.device)
            outputs.append(module(hidden_states=hidden[rows], encoder_hidden_states=embeds[rows, :length].to(dtype),
                                  pooled_projections=pooled[rows].to(dtype), timestep=timestep[rows],
                                  text_rope_pos=torch.arange(length, device=noisy.device), return_dict=False,
                                  **positions))  # (a tensor, not a tuple, with return_dict False)
        prediction = outputs[0]
        if len(outputs) > 1:  # back in the batch's order
            order = [row for rows in groups.values() for row in rows]
            prediction = torch.cat(outputs)[torch.tensor(sorted(range(len(order)), key=order.__getitem__), device=noisy.device)]
        return prediction.permute(0, 4, 1, 2, 3)  # back to (B, C, F, H, W)

    def fsdp_units(self, module):
        return [*module.text_transformer_blocks, *module.visual_transformer_blocks]

    # --- LoRA ----------------------------------------------------------------------------------
    def lora_may_adapt(self, name: str) -> bool:
        return name.startswith(("text_transformer_blocks.", "visual_transformer_blocks."))

    def lora_default_target(self, name: str) -> bool:
        return bool(_DEFAULT_TARGETS.match(name))

    def save_diffusers_lora(self, directory, weight_name, state_dict, adapter_metadata):
        self._pipeline_class.save_lora_weights(directory, transformer_lora_layers=state_dict, weight_name=weight_name,
                                               transformer_lora_adapter_metadata=adapter_metadata)

    # single_file_state_dict: the diffusers names are the original ones (Kandinsky's own checkpoints and ComfyUI's
    # Kandinsky5 model use them unchanged).

    def comfy_lora_key(self, peft_module_name: str) -> str:
        """`transformer.<name>`: ComfyUI's LoRA key map for Kandinsky 5 takes it (beside `diffusion_model.<name>`), and
        it is the name diffusers' `load_lora_weights` reads, so the default file loads in both."""
        return f"transformer.{peft_module_name}"

    def comfy_lora_keeps_alpha(self, peft_module_name: str) -> bool:
        """diffusers hands every key of the file to peft, which has no use for `.alpha`: alpha / rank goes into lora_B
        (ComfyUI then applies scale 1, the same update)."""
        return False

    # --- sampling ------------------------------------------------------------------------------
    @no_grad
    def sample(self, request: SampleRequest) -> np.ndarray:
        """One video from the stock pipeline, given the cached prompt embeddings (the pipeline's own negative prompt
        is used only when it encodes prompts itself: a sample with cfg_scale > 1 brings its negative prompt's)."""
        dtype = self.weight_dtype
        inputs = self._prompt_inputs(request.prompt_embeds, "")
        if request.negative_prompt_embeds is not None:
            inputs.update(self._prompt_inputs(request.negative_prompt_embeds, "negative_"))
        with self.taking_turns(first_frame=request.image is not None):
            pipeline = self._pipeline_class(transformer=self.transformer, vae=self.vae, scheduler=self.scheduler,
                                            text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
            pipeline.set_progress_bar_config(disable=True)
            hook = None
            if request.image is not None:
                from PIL import Image

                inputs["image"] = Image.fromarray(request.image)
                # the pipeline hands the image to the VAE in the transformer's dtype; the VAE may hold another
                hook = self.vae.encoder.register_forward_pre_hook(lambda module, args: (args[0].to(self.vae.dtype),))
            try:
                video = pipeline(**inputs, height=request.height, width=request.width, num_frames=request.frames,
                                 num_inference_steps=request.steps, guidance_scale=request.cfg_scale, output_type="np",
                                 generator=torch.Generator(device=self.device).manual_seed(request.seed)).frames[0]
            finally:
                if hook is not None:
                    hook.remove()
        return to_uint8(video)

    def _prompt_inputs(self, packed: torch.Tensor, prefix: str) -> dict:
        embeds, lengths, pooled = self._unpack(packed.to(self.device, torch.float32))
        length = int(lengths[0])
        return {f"{prefix}prompt_embeds_qwen": embeds[:, :length].to(self.weight_dtype),
                f"{prefix}prompt_embeds_clip": pooled.to(self.weight_dtype),
                f"{prefix}prompt_cu_seqlens": torch.tensor([0, length], dtype=torch.int32, device=self.device)}

    # --- tiny models (motiontune.testing) --------------------------------------------------------------
    @classmethod
    def tiny_pipeline(cls, name, tokenizer, clips, heads, layers):
        """Kandinsky 5's layout: the HunyuanVideo VAE (scaling_factor measured on the clips), Qwen2.5-VL (text and a
        tiny vision tower, as the release's `text_encoder` holds both), CLIP's text tower, and the transformer with
        its condition channels. Its modulation tables start at zero in diffusers (a fresh model's blocks do nothing,
        and nothing would train through them): they get random values here, as a trained model has."""
        from diffusers import (AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, Kandinsky5I2VPipeline,
                               Kandinsky5T2VPipeline, Kandinsky5Transformer3DModel)
        from transformers import CLIPTextConfig, CLIPTextModel, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        width = 32
        qwen = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
            text_config=dict(vocab_size=256, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
                             rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, pad_token_id=0, bos_token_id=1,
                             eos_token_id=1),
            vision_config=dict(depth=1, hidden_size=width, intermediate_size=2 * width, num_heads=2, out_hidden_size=width,
                               fullatt_block_indexes=[0]),
            pad_token_id=0, bos_token_id=1, eos_token_id=1)).eval()
        clip = CLIPTextModel(CLIPTextConfig(vocab_size=256, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                                            num_attention_heads=2, max_position_embeddings=77, pad_token_id=0, eos_token_id=1,
                                            bos_token_id=1)).eval()
        vae = AutoencoderKLHunyuanVideo(latent_channels=16, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
                                        norm_num_groups=4).eval()
        calibrate_scaling_factor(vae, clips)
        transformer = Kandinsky5Transformer3DModel(
            in_visual_dim=16, out_visual_dim=16, in_text_dim=width, in_text_dim2=width, time_dim=32, patch_size=(1, 2, 2),
            model_dim=64 * (heads or 2) // 2, ff_dim=128, num_text_blocks=1, num_visual_blocks=layers, axes_dims=(8, 12, 12),
            visual_cond=True)
        for name_, module in transformer.named_modules():
            if name_.endswith("modulation.out_layer") or name_.endswith("modulation"):
                for parameter in getattr(module, "out_layer", module).parameters():
                    torch.nn.init.normal_(parameter, std=0.05)
        pipeline = Kandinsky5I2VPipeline if name.endswith("i2v") else Kandinsky5T2VPipeline
        qwen_tokenizer = tokenizer("tokenizer", 2048)
        made = pipeline(transformer=transformer, vae=vae, text_encoder=qwen, tokenizer=qwen_tokenizer, text_encoder_2=clip,
                        tokenizer_2=tokenizer("tokenizer_2", 77), scheduler=FlowMatchEulerDiscreteScheduler(shift=10.0))
        _start_prompt_at_the_crop(qwen_tokenizer, made.prompt_template, made.prompt_template_encode_start_idx)
        return made

    # --- what estimate needs to know (motiontune/estimate asks; nothing here loads weights) ----------------------
    transformer_class_name = "Kandinsky5Transformer3DModel"
    block_groups = (("num_text_blocks", "text_transformer_blocks"), ("num_visual_blocks", "visual_transformer_blocks"))
    text_tokens = MAX_SEQUENCE_LENGTH
    TEXT_ENCODER_CLASSES = {"text_encoder": ("Qwen2.5-VL", "Qwen2_5_VLForConditionalGeneration"),
                            "text_encoder_2": ("CLIP-L", "CLIPTextModel")}

    def estimate_release(self, base: str) -> tuple[str, dict[str, dict]]:
        """(Hub id, its parts' configs): `base` when it is a release, else this model type's default one."""
        name = base if base in RELEASES else DEFAULT_RELEASE[self.config.model_type]
        release = RELEASES[name]
        return name, {"transformer": TRANSFORMERS[release["transformer"]], **SHARED_PARTS}

    def _estimate_text(self, batch: int, cfg: dict) -> torch.Tensor:
        row = pack(torch.zeros(MAX_SEQUENCE_LENGTH, cfg["in_text_dim"]), torch.tensor([float(MAX_SEQUENCE_LENGTH)]),
                   torch.zeros(cfg["in_text_dim2"]))
        return row.expand(batch, -1).clone()

    def estimate_step_inputs(self, cfg: dict, x0: torch.Tensor, dtype: torch.dtype):
        """(cached text rows, conditioning) of a training batch like `x0`: every prompt at the full 512 tokens."""
        text = self._estimate_text(len(x0), cfg)
        if not self.is_i2v:
            return text, None
        loss_frames = torch.ones(len(x0), x0.shape[2])
        return text, Conditioning(x0[:, :, :1].clone(), torch.ones(len(x0), dtype=torch.bool), loss_frames)

    def estimate_prepare(self, transformer: torch.nn.Module) -> None:
        """The time embedding's frequencies are a plain attribute (not a buffer), so the meta-device copy has no values
        for them and fake tensors cannot stand in: they are made again here as its constructor makes them."""
        from diffusers.models.transformers.transformer_kandinsky import get_freqs

        embed = transformer.time_embeddings
        with torch.device("cpu"):
            embed.freqs = get_freqs(embed.model_dim // 2, embed.max_period)

    def estimate_common_keys(self, cfg: dict) -> dict:
        """The sizes estimate reads, under the names other transformers give them: latent channels, heads × head
        width (= model_dim; the head width is the rope axes' sum)."""
        head = sum(cfg.get("axes_dims", (16, 24, 24)))
        return {"in_channels": cfg["in_visual_dim"], "out_channels": cfg["out_visual_dim"], "attention_head_dim": head,
                "num_attention_heads": cfg["model_dim"] // head}

    def estimate_sample_call(self, cfg: dict, latent: tuple[int, int, int], dtype: torch.dtype) -> dict:
        """One transformer call as the stock pipeline makes it while sampling (batch 1; guidance calls it twice in turn).
        Dense attention: a nabla checkpoint's sparse attention needs less."""
        f, h, w = latent
        spatial = self.vae_compression(self.config.model_type)[0]
        channels = 2 * cfg["in_visual_dim"] + 1 if cfg.get("visual_cond") else cfg["in_visual_dim"]
        return {"hidden_states": torch.empty(1, f, h, w, channels, dtype=dtype), "timestep": torch.empty(1, dtype=dtype),
                "encoder_hidden_states": torch.empty(1, MAX_SEQUENCE_LENGTH, cfg["in_text_dim"], dtype=dtype),
                "pooled_projections": torch.empty(1, cfg["in_text_dim2"], dtype=dtype),
                "visual_rope_pos": [torch.arange(f), torch.arange(h // 2), torch.arange(w // 2)],
                "text_rope_pos": torch.arange(MAX_SEQUENCE_LENGTH),
                "scale_factor": self._pipeline_class._get_scale_factor(None, h * spatial, w * spatial)}


def _start_prompt_at_the_crop(tokenizer, template: str, crop: int) -> None:
    """Real Qwen2.5-VL tokenizes the pipeline's template up to the prompt into exactly the `crop` tokens the pipeline
    cuts away; the tiny word-level tokenizer makes a few fewer, so it starts every text with `<pad>` fillers (its
    post-processor) until the prompt starts at token `crop` too (else the crop would cut into the prompt)."""
    from tokenizers import processors

    marker = tokenizer.convert_tokens_to_ids("rabbit")
    ids = tokenizer(template.format("rabbit"), add_special_tokens=False)["input_ids"]
    missing = crop - ids.index(marker)
    if missing < 0:
        raise ValueError(f"the tiny tokenizer makes {ids.index(marker)} template tokens, more than the {crop} cropped")
    single = " ".join(["<pad>"] * missing + ["$A"])
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single=single, special_tokens=[("<pad>", 0)])


# --- the released models, for `motiontune estimate` on a Hub id not on this machine ---------------------------------
_RELEASE_DATA = json.loads((Path(__file__).parent / "releases" / "kandinsky5.json").read_text())
RELEASES, TRANSFORMERS = _RELEASE_DATA["releases"], _RELEASE_DATA["transformers"]
SHARED_PARTS, DEFAULT_RELEASE = _RELEASE_DATA["shared_parts"], _RELEASE_DATA["default_release"]
