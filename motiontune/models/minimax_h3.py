"""MiniMax H3 (text-to-video with sound), as diffusers' modular `MiniMaxH3ModularPipeline` runs its `t2va` workflow:
one transformer denoises the prompt, the video and its stereo sound as ONE packed sequence, and both are trained here.

- Prompts: the prompt verbatim (no chat template, no special tokens) through Qwen3-VL; the hidden state after decoder
  layer 50 (`hidden_states[50]`, the pipeline's `text_encoder_layer`) is the conditioning. The pipeline does not pad;
  the cached row is [embeds (512 x D), mask (512)] (packing.py) and each sample is cut back to its own tokens before
  the transformer sees it, so the sequence is exactly the pipeline's.
- Video latents: frames in [0, 1] normalised with ImageNet's mean / std (the VAE's pixel convention), the posterior's
  mean, then per channel `(z - latents_mean) / latents_std`. 16x spatial; the VAE encodes 17-frame chunks and drops
  3 latent frames, so clips are 17n+5 frames (5n+2 latent frames). Patch (1, 2, 2): height and width multiples of 32.
- Sound: 32 kHz stereo over exactly the clip's window; the mono audio VAE reads each channel as a batch item; its
  mean, normalised with the audio VAE's `latents_mean` / `latents_std`, 40 latents a second
  (`audio_latent_num_frames`), packed channel-major into rows (2 x L, C) as the pipeline packs them.
- Layout and timesteps: the pipeline's own `[text | audio | video]` packed sequence (`build_packed_sequence`) and
  per-row timestep plan (`build_row_timesteps`). Its conventions differ from the shared flow: the transformer takes
  t = 1 - sigma in [0, 1] (t = 1 clean) and predicts the data-ward velocity x0 - noise; `predict` returns its
  negative, the trainer's target noise - x0. The audio rows get their own t (the sound's sigma).
- The transformer's structural inputs describe one layout shared by the whole batch, so `predict` calls it once per
  sample (each has its own prompt length and noise level).
- MiniMax H3 generates at a fixed 24 fps, and its rotary clock ties audio latents to video frames at that rate, so
  clips train at 24 fps. It is guidance-distilled: samples run one forward per step, without a negative prompt.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from pathlib import Path

from ..util.lazy import no_grad, np, torch
from .base import Expert, ModelFamily, SampleRequest, Sound, to_uint8
from .layout import OriginalLayout
from .loading import ModelLoadError, load_part
from .packing import FORMAT as PACKED, pack, unpack

log = logging.getLogger("motiontune")

FPS = 24  # MINIMAX_H3_FPS: what it generates at and what its rotary clock assumes
TEXT_LAYER = 50  # MiniMaxH3ModularPipeline.text_encoder_layer
MAX_TEXT_TOKENS = 512  # the cached row's length; the pipeline itself has no limit, longer prompts are cut here
AUDIO_LATENTS_PER_SECOND = 40  # the audio VAE's hop of 800 samples at 32 kHz
VIDEO_TAG, TEXT_TAG, AUDIO_TAG = 0, 1, 2  # the pipeline's per-row modality tags (a checkpoint contract)
DURATION = (5.0, 15.0)  # seconds the pipeline generates (min_duration / max_duration)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # the video VAE's pixel convention

# Attention and the output projection of the feed-forward in every block (video, audio and text rows share them).
# The feed-forward's fused input projection is left out: the original layout (ComfyUI's `mlp.fc1`) holds its two
# halves the other way round, which a ComfyUI LoRA entry cannot express (DIFFUSERS_LORA may adapt it).
_DEFAULT_TARGETS = (".attn.to_q", ".attn.to_k", ".attn.to_v", ".attn.to_out.0", ".ff.net.2")

_BLOCK_MODULES = {"attn.qkv_proj": ("attn.to_q", "attn.to_k", "attn.to_v"), "attn.out_proj": ("attn.to_out.0",),
                  "attn.q_norm": ("attn.norm_q",), "attn.k_norm": ("attn.norm_k",), "norm1": ("norm1",),
                  "norm2": ("norm2",), "mlp.fc1": ("ff.net.0.proj",), "mlp.fc2": ("ff.net.2",),
                  "adaln_proj.linear": ("adaln_proj.linear",)}
# The original (MiniMax / ComfyUI) names, as diffusers' converter of MiniMax H3 LoRAs reads them
LAYOUT = OriginalLayout(
    "MiniMax H3",
    outside={"video_patch_proj": "proj_in", "audio_patch_proj": "audio_proj_in", "condition_proj": "context_embedder",
             "time_embedder.proj_in": "time_embedder.linear_1", "time_embedder.proj_out": "time_embedder.linear_2",
             "final_layer.adaln_proj.linear": "norm_out.linear", "final_layer.video_out": "proj_out",
             "final_layer.audio_out": "audio_proj_out", "final_layer.norm": "norm_out.norm",
             "token_refiner.final_norm": "token_refiner.final_norm"},
    blocks=(("blocks", "transformer_blocks", _BLOCK_MODULES),
            ("token_refiner.blocks", "token_refiner.refiner_blocks", _BLOCK_MODULES)),
)


class MiniMaxH3Family(ModelFamily):
    MODEL_TYPES = ("MINIMAX_H3",)
    NAME = "MiniMax H3"
    TINY_MODELS = ("minimax-h3",)
    MIN_SAMPLE_STEPS = 2  # its pipeline's set_timesteps refuses a one-step schedule
    VAE_CLASS = "AutoencoderKLMiniMaxH3"
    VAE_COMPRESSION = (16, 4)
    temporal_factor = 4
    spatial_multiple = 32  # the VAE's 16x and the transformer's 2x2 patch (the pipeline's canvas_multiple)
    frame_rule = "the VAE takes 17n+5"
    AUDIO_SAMPLE_RATE = 32000
    AUDIO_CHANNELS = 2
    ENCODER_PARTS = {"vae": ("vae", "audio_vae"), "text": ("tokenizer", "text_encoder")}
    TEXT_FORMAT = PACKED
    QUANTIZED_TEXT_ENCODER = True  # Qwen3-VL-32B is ~62 GB in bf16
    ORIGINAL_LAYOUT = LAYOUT
    audio_vae = None

    @classmethod
    def config_problems(cls, config) -> list[str]:
        problems = super().config_problems(config)
        if config.training_method == "EMBEDDING" or config.additional_embeddings:
            problems.append("  - training_method EMBEDDING / additional_embeddings: MiniMax H3's pipeline has no "
                            "textual-inversion loader for its Qwen3-VL encoder; train a LoRA instead")
        if config.text_encoder.train:
            problems.append("  - text_encoder.train = true: training Qwen3-VL with MiniMax H3 is not supported; set it to false")
        if not config.video_config.use_temporal_attention:
            problems.append("  - video_config.use_temporal_attention = false: MiniMax H3 attends over one packed sequence "
                            "of text, sound and video; set it to true")
        if config.video_config.target_fps != FPS:
            problems.append(f"  - video_config.target_fps = {config.video_config.target_fps:g}: MiniMax H3 generates at "
                            f"{FPS} fps and its positions tie sound to frames at that rate; set it to {FPS}")
        return problems

    def valid_frame_count(self, frames: int) -> int:
        """The largest 17n+5 <= `frames` (the VAE encodes 17-frame chunks and drops 3 latent frames of the last)."""
        return (frames - 5) // 17 * 17 + 5 if frames >= 5 else 0

    # --- loading -------------------------------------------------------------------------------
    def load_transformers(self) -> None:
        from diffusers import MiniMaxH3Scheduler, MiniMaxH3Transformer3DModel

        base = self.config.base_model_name
        self.scheduler = load_part(MiniMaxH3Scheduler, base, "scheduler")
        self.audio_scheduler = load_part(MiniMaxH3Scheduler, base, "audio_scheduler")
        self.transformer = self.load_transformer(MiniMaxH3Transformer3DModel, "transformer", self.config.transformer)

    def load_vae(self) -> None:
        """The video VAE (in vae.weight_dtype) and the audio VAE (float32, as released: it degrades in bfloat16)."""
        from diffusers import AutoencoderKLMiniMaxH3Audio

        super().load_vae()
        if self.audio_vae is None:
            self.audio_vae = load_part(AutoencoderKLMiniMaxH3Audio, self.config.base_model_name, "audio_vae",
                                       dtype=torch.float32).requires_grad_(False).eval()
            if self.audio_vae.config.sampling_rate != self.AUDIO_SAMPLE_RATE:
                raise ModelLoadError(f"{self.config.base_model_name}/audio_vae reads {self.audio_vae.config.sampling_rate} Hz; "
                                     f"MiniMax H3's reads {self.AUDIO_SAMPLE_RATE} Hz. Use a MiniMax H3 model folder.")
        self.audio_vae.to(self.device)

    def release_vae(self) -> None:
        self.audio_vae = None
        super().release_vae()

    def park_vae(self) -> None:
        if self.audio_vae is not None:
            self.audio_vae.to("cpu")
        super().park_vae()

    def load_text_encoder(self) -> None:
        from transformers import Qwen2TokenizerFast, Qwen3VLForConditionalGeneration

        model = self.load_text_model(Qwen3VLForConditionalGeneration, "text_encoder", quantize="model")
        layers = model.config.text_config.num_hidden_layers
        if layers <= TEXT_LAYER:
            raise ModelLoadError(f"{self.config.base_model_name}/text_encoder has {layers} decoder layers; MiniMax H3 reads "
                                 f"the hidden state after layer {TEXT_LAYER}. Use the model's own Qwen3-VL encoder.")
        self.encoders = {"qwen3vl": (load_part(Qwen2TokenizerFast, self.config.base_model_name, "tokenizer"), model)}

    # --- encoding ------------------------------------------------------------------------------
    def _encode(self, prompts: list[str]) -> torch.Tensor:
        tokenizer, qwen = self.encoders["qwen3vl"]
        # what the processor's create_mm_token_type_ids gives a text-only presentation: 1 / 2 on image / video pads
        pads = [tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>")]
        rows = []
        for prompt in prompts:
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"][:MAX_TEXT_TOKENS]
            if not ids:  # an empty caption (caption dropout): no text rows at all, as the packed layout allows
                rows.append(pack(torch.zeros(MAX_TEXT_TOKENS, qwen.config.text_config.hidden_size, device=self.device),
                                 torch.zeros(MAX_TEXT_TOKENS, device=self.device)))
                continue
            input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
            kinds = (input_ids == pads[0]).long() + 2 * (input_ids == pads[1]).long()
            hidden = qwen.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), mm_token_type_ids=kinds,
                                use_cache=False, output_hidden_states=True).hidden_states[TEXT_LAYER][0]
            padded = torch.zeros(MAX_TEXT_TOKENS, hidden.shape[-1], device=hidden.device, dtype=hidden.dtype)
            padded[: len(ids)] = hidden
            mask = torch.zeros(MAX_TEXT_TOKENS, device=hidden.device)
            mask[: len(ids)] = 1
            rows.append(pack(padded, mask))
        return torch.stack(rows)

    @staticmethod
    def _unpack(row: torch.Tensor) -> torch.Tensor:
        """One cached row → the prompt's embeddings (1, tokens, D), its padding cut off."""
        embeds, mask = unpack(row.reshape(1, -1))
        return embeds[:, : int(mask.sum().item())]

    @no_grad
    def encode_video(self, frames: np.ndarray) -> torch.Tensor:
        pixels = torch.from_numpy(frames).to(self.device).permute(3, 0, 1, 2).unsqueeze(0).float() / 255.0
        mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1, 1)
        latents = self.vae_latents((pixels - mean) / std)
        cfg = self.vae.config
        shift = torch.tensor(cfg.latents_mean, device=latents.device).view(1, -1, 1, 1, 1)
        scale = torch.tensor(cfg.latents_std, device=latents.device).view(1, -1, 1, 1, 1)
        return ((latents - shift) / scale)[0].to("cpu")

    @staticmethod
    def audio_steps(frames: int, fps: float) -> int:
        """Audio latents per channel for `frames` frames at `fps`: the pipeline's `audio_latent_num_frames`."""
        return int(round(frames / fps * AUDIO_LATENTS_PER_SECOND))

    def audio_latent_shape(self, frames: int, fps: float) -> tuple[int, ...]:
        channels = (self.transformer.config.audio_in_channels if self.transformer is not None
                    else self.audio_vae.config.latent_channels)
        return (self.AUDIO_CHANNELS * self.audio_steps(frames, fps), channels)

    @no_grad
    def encode_audio(self, waveform: np.ndarray, frames: int, fps: float) -> torch.Tensor:
        """(2, samples) at 32 kHz → channel-major rows (2 x L, C), as the pipeline encodes a soundtrack."""
        sound = torch.from_numpy(waveform).float().to(self.device)[:, None]  # each channel a batch item
        latents = self.audio_vae.encode(sound).latent_dist.mode().float().transpose(1, 2)  # (2, L', C)
        steps = self.audio_steps(frames, fps)
        if latents.shape[1] < steps:  # the encoder's ceil(samples / 800) may fall one short of the rounding
            latents = torch.cat([latents, latents[:, -1:].expand(-1, steps - latents.shape[1], -1)], dim=1)
        latents = latents[:, :steps]
        cfg = self.audio_vae.config
        mean = torch.tensor(cfg.latents_mean, device=latents.device).view(1, 1, -1)
        std = torch.tensor(cfg.latents_std, device=latents.device).view(1, 1, -1)
        return ((latents - mean) / std).reshape(-1, latents.shape[-1]).to("cpu")

    # --- training ------------------------------------------------------------------------------
    def trained_experts(self) -> list[Expert]:
        return [Expert("transformer", "", self.transformer, (0.0, 1.0))]

    def predict(self, noisy, sigma, text, expert, conditioning=None, sound=None):
        """(video prediction, audio prediction) in the shared convention (noise - x0) given `sound`; without it
        (memory estimates) the sound is pure noise at sigma = 1 and only the video prediction is returned."""
        from diffusers.modular_pipelines.minimax_h3.before_denoise import patchify_video_latents

        model = expert.module
        batch, channels, frames, height, width = noisy.shape
        patch = tuple(model.config.patch_size)
        given = sound
        if sound is None:
            steps = self.audio_steps(self.pixel_frames(frames), FPS)
            shape = (batch, self.AUDIO_CHANNELS * steps, model.config.audio_in_channels)
            sound = Sound(torch.randn(shape, device=noisy.device), torch.ones_like(sigma))
        videos, audios = [], []
        for i in range(batch):  # one packed layout per call (see the module's docstring)
            prompt = self._unpack(text[i].to(noisy.device, torch.float32))
            layout = packed_layout(prompt.shape[1], frames, height, width, sound.noisy.shape[1] // self.AUDIO_CHANNELS, patch)
            layout = {name: value.to(noisy.device) for name, value in layout.items()}
            # the pipeline's row plan: text and video rows at the video's t, audio rows at the sound's (t = 1 - sigma)
            timesteps = 1.0 - torch.stack([sigma[i], sound.sigma[i]]).float()
            video, audio = model(
                hidden_states=patchify_video_latents(noisy[i : i + 1].float(), patch)[None].to(self.weight_dtype),
                audio_hidden_states=sound.noisy[i : i + 1].to(self.weight_dtype),
                encoder_hidden_states=prompt.to(self.weight_dtype), timestep=timesteps, return_dict=False, **layout)
            videos.append(_unpatchify(video[0], channels, frames, height, width, patch))
            audios.append(audio[0])
        # the transformer's velocity points at the data (x0 = x_t + sigma v); the trainer's target is noise - x0
        video, audio = -torch.stack(videos), -torch.stack(audios)
        return video if given is None else (video, audio)

    def latent_frame_count(self, frames: int) -> int:
        """5n+2 latent frames of 17n+5 frames (the VAE's `video_latent_num_frames`)."""
        return (frames - 5) // 17 * 5 + 2

    @staticmethod
    def pixel_frames(latent_frames: int) -> int:
        """Pixel frames of `latent_frames` latent frames (5n+2 → 17n+5)."""
        return (latent_frames - 2) // 5 * 17 + 5

    def fsdp_units(self, module):
        return list(module.transformer_blocks)

    def lora_may_adapt(self, name: str) -> bool:
        """The blocks' Linears; in the default COMFY_LORA format not the feed-forward's fused input projection, whose
        halves the original layout swaps (an adapter there would be applied to the wrong half in ComfyUI)."""
        if self.config.output_model_format == "COMFY_LORA" and name.endswith(".ff.net.0.proj"):
            return False
        return name.startswith(("transformer_blocks.", "token_refiner.refiner_blocks."))

    def lora_default_target(self, name: str) -> bool:
        return name.startswith("transformer_blocks.") and name.endswith(_DEFAULT_TARGETS)

    def save_diffusers_lora(self, directory, weight_name, state_dict, adapter_metadata):
        from diffusers.modular_pipelines import MiniMaxH3ModularPipeline

        MiniMaxH3ModularPipeline.save_lora_weights(directory, transformer_lora_layers=state_dict, weight_name=weight_name,
                                                   transformer_lora_adapter_metadata=adapter_metadata)

    def single_file_state_dict(self, module, dtype, state=None) -> dict:
        """The original layout (q, k, v fused [q; k; v]), with each `mlp.fc1` as the original holds it: [gate; value],
        diffusers' [value; gate] the other way round, and the rotary frequencies (`rope.inv_freq`, a buffer diffusers
        does not save), from which ComfyUI's model detection reads the rotary size. diffusers' `from_single_file`
        converts the file back (and drops the buffer)."""
        converted = super().single_file_state_dict(module, dtype, state)
        for key in [k for k in converted if k.endswith(".mlp.fc1.weight")]:
            value, gate = converted[key].chunk(2)
            converted[key] = torch.cat([gate, value]).contiguous()
        converted["rope.inv_freq"] = module.rope.inv_freq.detach().to("cpu", torch.float32).contiguous()
        return converted

    def comfy_lora_keeps_alpha(self, peft_module_name: str) -> bool:
        """ComfyUI scales by alpha / rank, and diffusers' converter folds `.alpha` into the factors the same way."""
        return True

    # --- sampling ------------------------------------------------------------------------------
    @no_grad
    def sample(self, request: SampleRequest):
        """The pipeline's `t2va` blocks after its text encoder, given the cached prompt; guidance-distilled, so the
        negative prompt and cfg_scale do not apply."""
        from diffusers.modular_pipelines import MiniMaxH3Blocks

        blocks = MiniMaxH3Blocks().get_workflow("t2va")
        blocks.sub_blocks.pop("text_encoder")
        prompt = self._unpack(request.prompt_embeds.to(self.device, torch.float32))
        frames = sample_frames(request.frames)
        if frames != request.frames:
            log.warning("sample of %d frames: MiniMax H3's pipeline generates %g to %g s at %d fps (17n+5 frames), so "
                        "this one has %d", request.frames, *DURATION, FPS, frames)
        with self.taking_turns(first_frame=False):
            # the turns move the video VAE; the audio VAE (small) waits in host memory between samples (park_vae),
            # so it comes back for the decode here (found by motiontune check: its weights met GPU latents)
            self.audio_vae.to(self.device)
            pipe = blocks.init_pipeline()
            # the blocks make their tensors on the pipeline's device, which it reads off its first part: the
            # transformer, parked in host memory while the VAE decodes, so the audio decode made host tensors for GPU
            # latents (found by motiontune check). The parts take turns on the training device: that is the device
            pipe.__class__ = type(type(pipe).__name__, (type(pipe),), {"_execution_device": property(lambda _: self.device)})
            pipe.update_components(transformer=self.transformer, vae=self.vae, audio_vae=self.audio_vae,
                                   scheduler=self.scheduler, audio_scheduler=self.audio_scheduler)
            out = pipe(prompt_embeds=prompt.to(self.weight_dtype),
                       text_token_tags=torch.full((prompt.shape[1],), TEXT_TAG, dtype=torch.long),
                       height=request.height, width=request.width, num_frames=frames,
                       num_inference_steps=request.steps, generator=torch.Generator(device=self.device).manual_seed(request.seed),
                       output_type="np", output=["videos", "audio", "sampling_rate"])
        return to_uint8(out["videos"][0]), out["audio"][0].float().cpu().numpy(), int(out["sampling_rate"])

    # --- tiny models (motiontune.testing) --------------------------------------------------------------
    @classmethod
    def tiny_pipeline(cls, name, tokenizer, clips, heads, layers):
        """MiniMax H3's layout, tiny: Qwen3-VL (with its vision tower, as released) of 51 thin layers (the pipeline
        reads layer 50) and a byte-level BPE tokenizer as Qwen's, the 16x video VAE (8 latent channels, a 1-layer ViT
        decoder), the 32 kHz audio VAE (hop 800, as released: 40 latents a second), the packed-sequence transformer
        and its two schedulers (shift 12 video, 3 audio). Latent statistics measured on the bundled clips and on
        tones and noise."""
        from diffusers import (AutoencoderKLMiniMaxH3, AutoencoderKLMiniMaxH3Audio, MiniMaxH3Scheduler,
                               MiniMaxH3Transformer3DModel)
        from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

        qwen_tokenizer = _tiny_qwen_tokenizer(tokenizer)
        pad = {t: qwen_tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
        width = 32
        qwen = Qwen3VLForConditionalGeneration(Qwen3VLConfig(
            text_config=dict(vocab_size=len(qwen_tokenizer), hidden_size=width, intermediate_size=2 * width,
                             num_hidden_layers=TEXT_LAYER + 1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                             rope_parameters={"rope_theta": 500000.0, "rope_type": "default", "mrope_section": [4, 2, 2],
                                              "mrope_interleaved": True}),
            vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=width,
                               patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                               deepstack_visual_indexes=[0]),
            image_token_id=pad["<|image_pad|>"], video_token_id=pad["<|video_pad|>"],
            vision_start_token_id=pad["<|vision_start|>"], vision_end_token_id=pad["<|vision_end|>"])).eval()
        vae = AutoencoderKLMiniMaxH3(latent_channels=8, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
                                     spatial_downsample_factors=(2, 2, 2, 2), temporal_downsample_factors=(1, 2, 2, 1),
                                     norm_num_groups=4, decoder_num_layers=1, decoder_num_attention_heads=2,
                                     decoder_attention_head_dim=16, decoder_num_register_tokens=1, decoder_ffn_mult=2).eval()
        audio_vae = AutoencoderKLMiniMaxH3Audio(
            encoder_dim=4, encoder_rates=(2, 4, 4, 5, 5), latent_dim=32, latent_channels=8, num_attention_heads=2,
            decoder_dim=64, decoder_rates=(5, 5, 4, 8), decoder_kernel_sizes=(10, 10, 8, 16), resblock_kernel_sizes=(3,),
            resblock_dilation_sizes=((1,),)).eval()
        with torch.no_grad():  # per-channel statistics of the VAEs' own encodings, as the released ones were measured
            mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1, 1)
            latents = torch.cat([vae.encode(((clip + 1) / 2 - mean) / std).latent_dist.mean for clip in clips])
            vae.register_to_config(latents_mean=latents.mean(dim=(0, 2, 3, 4)).tolist(),
                                   latents_std=latents.std(dim=(0, 2, 3, 4)).tolist())
            rate = cls.AUDIO_SAMPLE_RATE
            sounds = [np.sin(2 * np.pi * hz * np.arange(rate) / rate) * 0.5 for hz in (220, 440, 880)]
            sounds.append(np.random.default_rng(0).normal(0, 0.1, rate))
            waves = torch.tensor(np.stack(sounds), dtype=torch.float32)[:, None]
            audio = audio_vae.encode(waves).latent_dist.mode().transpose(1, 2).reshape(-1, 8)
            audio_vae.register_to_config(latents_mean=audio.mean(0).tolist(), latents_std=audio.std(0).tolist())
        transformer = MiniMaxH3Transformer3DModel(
            num_attention_heads=heads or 4, attention_head_dim=24, hidden_size=2 * width, num_layers=layers,
            num_refiner_layers=1, ffn_dim=4 * width, in_channels=8, audio_in_channels=8, text_dim=width, freq_dim=32,
            time_embed_hidden_dim=width, time_embed_dim=16, rope_freq_dim=4)
        return _TinyModularModel(dict(text_encoder=qwen, tokenizer=qwen_tokenizer, vae=vae, audio_vae=audio_vae,
                                      transformer=transformer, scheduler=MiniMaxH3Scheduler(shift=12.0),
                                      audio_scheduler=MiniMaxH3Scheduler(shift=3.0)))


    # --- what estimate needs to know (motiontune/estimate asks; nothing here loads weights) ----------------------
    transformer_class_name = "MiniMaxH3Transformer3DModel"
    block_groups = (("num_layers", "transformer_blocks"),)
    text_tokens = MAX_TEXT_TOKENS  # the longest prompt the cache holds

    def estimate_release(self, base: str) -> tuple[str, dict[str, dict]]:
        """(Hub id, its parts' configs): the one release, whatever `base` names."""
        return RELEASE["release"], RELEASE["parts"]

    def _estimate_text(self, batch: int, cfg: dict) -> torch.Tensor:
        row = pack(torch.zeros(MAX_TEXT_TOKENS, cfg.get("text_dim", 5120)), torch.ones(MAX_TEXT_TOKENS))
        return row.expand(batch, -1).clone()

    def estimate_step_inputs(self, cfg: dict, x0: torch.Tensor, dtype: torch.dtype):
        """(cached text rows of the longest prompt, no conditioning); `predict` adds the clip's sound rows."""
        return self._estimate_text(len(x0), cfg), None

    def estimate_sample_call(self, cfg: dict, latent: tuple[int, int, int], dtype: torch.dtype) -> dict:
        """One transformer call as the pipeline makes it while sampling (batch 1, one forward a step)."""
        f, h, w = latent
        patch = tuple(cfg.get("patch_size", (1, 2, 2)))
        steps = self.audio_steps(self.pixel_frames(f), FPS)
        rows = (f // patch[0]) * (h // patch[1]) * (w // patch[2])
        return {"hidden_states": torch.empty(1, rows, cfg.get("in_channels", 24) * math.prod(patch), dtype=dtype),
                "audio_hidden_states": torch.empty(1, self.AUDIO_CHANNELS * steps, cfg.get("audio_in_channels", 32), dtype=dtype),
                "encoder_hidden_states": torch.empty(1, MAX_TEXT_TOKENS, cfg.get("text_dim", 5120), dtype=dtype),
                "timestep": torch.empty(2), **packed_layout(MAX_TEXT_TOKENS, f, h, w, steps, patch)}

    def estimate_text_encoders(self, configs: dict[str, dict]) -> list[tuple[str, torch.nn.Module]]:
        from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

        with torch.device("meta"):
            return [("Qwen3-VL", Qwen3VLForConditionalGeneration(Qwen3VLConfig(**configs["text_encoder"])))]


# the released model, for `motiontune estimate` on a Hub id not on this machine
RELEASE = json.loads((Path(__file__).parent / "releases" / "minimax_h3.json").read_text())


def sample_frames(frames: int) -> int:
    """The frames the pipeline generates for a request of `frames`: rounded up to 17n+5 (its `align_num_frames`),
    and into its 5-15 s at 24 fps: 124 to 345 frames."""
    aligned = frames + (5 - frames) % 17 if frames >= 5 else 5
    shortest, longest = (math.ceil(DURATION[0] * FPS), math.floor(DURATION[1] * FPS))
    while aligned < shortest:
        aligned += 17
    while aligned > longest:
        aligned -= 17
    return aligned


@functools.lru_cache(maxsize=64)
def packed_layout(text_tokens: int, frames: int, height: int, width: int, audio_steps: int, patch: tuple) -> dict:
    """The transformer's structural inputs for one sample, built by the pipeline's own `build_packed_sequence`
    (`[text | audio | video]`, its float64 rotary grid), plus each row's timestep index: 0 (the video's) for text and
    video rows, 1 (the sound's) for audio rows. Built outside any fake-tensor mode (memory estimates): it is data."""
    from diffusers.modular_pipelines.minimax_h3.before_denoise import MiniMaxH3PrepareLayoutStep

    with _real_tensors():
        positions, tags, video_rows, audio_rows, text_rows, _, _ = MiniMaxH3PrepareLayoutStep.build_packed_sequence(
            torch.full((text_tokens,), TEXT_TAG), frames, height, width, audio_steps, patch, MiniMaxH3Family.AUDIO_CHANNELS,
            AUDIO_TAG, VIDEO_TAG)
        indices = torch.zeros(len(positions), dtype=torch.long)
        indices[audio_rows] = 1
    return {"position_ids": positions, "token_tags": tags, "video_indices": video_rows, "audio_indices": audio_rows,
            "text_indices": text_rows, "timestep_indices": indices}


def _real_tensors():
    """A context in which tensors are real even inside a fake-tensor mode (estimate's simulated step)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    return unset_fake_temporarily()


def _unpatchify(rows: torch.Tensor, channels: int, frames: int, height: int, width: int, patch) -> torch.Tensor:
    """(rows, C x patch) → (C, F, H, W): the pipeline's after-denoise unpacking, one sample."""
    pt, ph, pw = patch
    rows = rows.reshape(frames // pt, height // ph, width // pw, channels, pt, ph, pw)
    return rows.permute(3, 0, 4, 1, 5, 2, 6).reshape(channels, frames, height, width)


def _tiny_qwen_tokenizer(tokenizer):
    """A byte-level BPE tokenizer (Qwen's kind) trained on the tiny word list, with Qwen's vision tokens, loaded as
    the pipeline loads its tokenizer (Qwen2TokenizerFast), so a word-level one would not survive the round trip."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast, Qwen2TokenizerFast

    from ..testing.tiny_models import _WORDS

    words = tokenizer("tokenizer", MAX_TEXT_TOKENS)  # makes the folder the tokenizer is saved in; replaced here
    folder = Path(words.name_or_path)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([" ".join(_WORDS)] * 3, vocab_size=400, min_frequency=1, show_progress=False,
                            special_tokens=["<|endoftext|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                                            "<|video_pad|>"])
    for stale in folder.iterdir():
        stale.unlink()
    PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, pad_token="<|endoftext|>",
                            eos_token="<|endoftext|>").save_pretrained(folder)
    return Qwen2TokenizerFast.from_pretrained(folder)


class _TinyModularModel:
    """The parts as MiniMax H3's modular pipeline saves them (its `save_pretrained` writes each part's folder and a
    `modular_model_index.json` that names them), so `ModularPipeline.from_pretrained` loads the tiny model."""

    def __init__(self, parts: dict):
        self.parts = parts

    def save_pretrained(self, out) -> None:
        from diffusers.modular_pipelines import MiniMaxH3Blocks

        pipe = MiniMaxH3Blocks().init_pipeline()
        pipe.update_components(**self.parts)
        pipe.save_pretrained(str(out), overwrite_modular_index=True)
        index = Path(out) / "modular_model_index.json"
        entries = json.loads(index.read_text())
        # no processor (Qwen3-VL's needs torchvision, which a text-only request never uses), and no transformer_ref
        for unused in ("processor", "transformer_ref"):
            entries.pop(unused, None)
        index.write_text(json.dumps(entries, indent=2) + "\n")
