"""Tiny random models of the real architectures, saved as complete diffusers pipeline folders.

Tests, the demo and the benchmarks load these through the same code path as real weights, so the
loading code is exercised for real. Every weight is random (seeded); nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

FAMILIES = ("wan-2.1", "wan-2.2-a14b", "wan-2.2-ti2v-5b", "wan-2.2-i2v-a14b", "wan-2.1-i2v", "hi-dream", "hunyuan-video")

# Word-level vocabulary: enough words for the demo captions and test prompts; others map to <unk>.
_WORDS = (
    "a the an of and in on with at to from is are video clip film shot scene man woman person people "
    "dog cat bird car street city sky sea water tree forest room light dark black white red green blue "
    "yellow orange purple grey gray moving moves walks walking runs running dances dancing shape shapes "
    "circle square triangle ball old silent comedy slow fast camera pan zoom close up wide view rabbit "
    "pig pigs cartoon animation test pattern bars colour color motion style"
).split()


def build_tokenizer(directory: Path, model_max_length: int = 512) -> None:
    """A UMT5-style tokenizer (pad=0, eos=1, unk=2, `</s>` appended) built with `tokenizers`."""
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in _WORDS:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=model_max_length,
    )
    fast.save_pretrained(directory)


def _text_encoder(text_dim: int):
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(
        vocab_size=256,  # >= the tokenizer vocabulary below
        d_model=text_dim,
        d_kv=8,
        d_ff=2 * text_dim,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return UMT5EncoderModel(config).eval()


def _vae(wide: bool):
    from diffusers import AutoencoderKLWan

    if wide:  # Wan 2.2 VAE: 48 channels, 16x spatial (patchified 2x on top of 8x), residual blocks
        return AutoencoderKLWan(
            base_dim=16,
            decoder_base_dim=16,
            z_dim=48,
            dim_mult=[1, 2, 2, 2],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
            is_residual=True,
            in_channels=12,
            out_channels=12,
            patch_size=2,
            scale_factor_spatial=16,
        ).eval()
    return AutoencoderKLWan(
        base_dim=8,
        z_dim=16,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    ).eval()


@torch.no_grad()
def _calibrate_latent_stats(vae) -> None:
    """Set latents_mean/latents_std from the VAE's own encodings of the bundled clips, as the real
    WAN statistics were measured on data: normalised latents are then about N(0, 1) per channel,
    and a missing or wrong normalisation shows up in training results."""
    from ..data.video import decode_frames

    clips = sorted((Path(__file__).parent.parent / "demo" / "clips").glob("*.mp4"))
    latents = []
    for clip in clips:
        frames = decode_frames(clip, [i / 8 for i in range(9)], (64, 64))
        pixels = torch.from_numpy(frames).permute(3, 0, 1, 2).unsqueeze(0).float() / 127.5 - 1.0
        latents.append(vae.encode(pixels).latent_dist.mean)
    stacked = torch.cat(latents).transpose(0, 1).flatten(1)  # channels × values
    vae.register_to_config(
        latents_mean=[round(v, 4) for v in stacked.mean(1).tolist()],
        latents_std=[round(v, 4) for v in stacked.std(1).tolist()],
    )


def _clip_vision(width: int):
    """A tiny CLIP vision encoder and its image processor (WAN 2.1 I2V uses a ViT-H/14 at 224 px)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    encoder = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
    )).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return encoder, processor


def _transformer(in_channels: int, text_dim: int, *, heads: int = 2, head_dim: int = 24, layers: int = 2,
                 out_channels: int | None = None, image_dim: int | None = None):
    from diffusers import WanTransformer3DModel

    # WAN 2.1 I2V: cross-attention also attends to the CLIP image tokens, through its own key/value projections
    image = {"image_dim": image_dim, "added_kv_proj_dim": heads * head_dim} if image_dim else {}
    return WanTransformer3DModel(
        **image,
        patch_size=(1, 2, 2),
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=in_channels,
        out_channels=out_channels or in_channels,
        text_dim=text_dim,
        freq_dim=32,
        ffn_dim=4 * heads * head_dim,
        num_layers=layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=64,
    )


def make_tiny_model(family: str, out_dir: str | Path, seed: int = 0, heads: int | None = None, layers: int = 2) -> Path:
    """Write a tiny random `family` model as a diffusers folder that `WanPipeline.from_pretrained` loads."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanPipeline

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of: {', '.join(FAMILIES)}")
    out = Path(out_dir)
    torch.manual_seed(seed)
    if family == "hi-dream":
        return _make_hidream(out, seed)
    if family == "hunyuan-video":
        return _make_hunyuan_video(out, seed)
    text_dim = 32
    wide_vae = family == "wan-2.2-ti2v-5b"
    vae = _vae(wide_vae)
    _calibrate_latent_stats(vae)
    latent_channels = vae.config.z_dim
    # the token width must hold a 2x2 patch of latent channels (64 values; 192 for TI2V-5B's 48 channels)
    heads = heads or (8 if wide_vae else 4)
    two_experts = family in ("wan-2.2-a14b", "wan-2.2-i2v-a14b")
    image_to_video = family in ("wan-2.2-i2v-a14b", "wan-2.1-i2v")
    image_dim = 32 if family == "wan-2.1-i2v" else None  # the tiny CLIP vision encoder's width
    # I2V: the noisy latents plus a 4-channel first-frame mask and the first frame's latents
    in_channels = latent_channels * 2 + 4 if image_to_video else latent_channels
    transformer = _transformer(in_channels, text_dim, heads=heads, layers=layers, out_channels=latent_channels, image_dim=image_dim)
    transformer_2 = _transformer(in_channels, text_dim, heads=heads, layers=layers, out_channels=latent_channels) if two_experts else None
    # Wan 2.1 and 2.2 ship with shift 3.0 / 5.0 in their flow-matching scheduler config.
    scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0 if family.startswith("wan-2.2") else 3.0)

    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out / "tokenizer")
    from transformers import AutoTokenizer

    parts = dict(
        tokenizer=AutoTokenizer.from_pretrained(out / "tokenizer"),
        text_encoder=_text_encoder(text_dim),
        vae=vae,
        scheduler=scheduler,
        transformer=transformer,
        transformer_2=transformer_2,
        boundary_ratio=(0.9 if image_to_video else 0.875) if two_experts else None,
        expand_timesteps=family == "wan-2.2-ti2v-5b",
    )
    # WAN 2.2 I2V A14B ships without a CLIP image encoder; WAN 2.1 I2V has one
    image_encoder, image_processor = _clip_vision(image_dim) if image_dim else (None, None)
    pipe = (WanImageToVideoPipeline(image_encoder=image_encoder, image_processor=image_processor, **parts) if image_to_video
            else WanPipeline(**parts))
    pipe.save_pretrained(out)
    (out / "motiontune_tiny.json").write_text(json.dumps({"family": family, "seed": seed}) + "\n")
    return out


def _make_hidream(out: Path, seed: int) -> Path:
    """HiDream-I1's layout: a 16-channel image VAE, two CLIP text encoders with projections, T5, Llama, and the
    MoE transformer reading T5, two Llama layers and the pooled CLIP vectors."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, HiDreamImagePipeline, HiDreamImageTransformer2DModel
    from transformers import (AutoTokenizer, CLIPTextConfig, CLIPTextModelWithProjection, LlamaConfig, LlamaForCausalLM,
                              T5Config, T5EncoderModel)

    width = 32
    out.mkdir(parents=True, exist_ok=True)
    for index in ("", "_2", "_3", "_4"):
        build_tokenizer(out / f"tokenizer{index}", model_max_length=128)
    clip = [CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=256, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=128, projection_dim=width, pad_token_id=0, eos_token_id=1, bos_token_id=1,
    )).eval() for _ in range(2)]
    t5 = T5EncoderModel(T5Config(vocab_size=256, d_model=width, d_kv=8, d_ff=2 * width, num_layers=2, num_heads=2,
                                 relative_attention_num_buckets=8, relative_attention_max_distance=32)).eval()
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                                         pad_token_id=1, bos_token_id=1, eos_token_id=1)).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8, 16, 16),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=4).eval()
    _calibrate_image_latents(vae)
    transformer = HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=32,
        num_attention_heads=2, caption_channels=[width, width], text_emb_dim=2 * width, num_routed_experts=2,
        num_activated_experts=1, axes_dims_rope=(16, 8, 8), max_resolution=(16, 16), llama_layers=[0, 1],
    )
    tokenizers = {f"tokenizer{i}": AutoTokenizer.from_pretrained(out / f"tokenizer{i}") for i in ("", "_2", "_3", "_4")}
    HiDreamImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=clip[0], text_encoder_2=clip[1],
        text_encoder_3=t5, text_encoder_4=llama, transformer=transformer, **tokenizers,
    ).save_pretrained(out)
    (out / "motiontune_tiny.json").write_text(json.dumps({"family": "hi-dream", "seed": seed}) + "\n")
    return out


@torch.no_grad()
def _calibrate_image_latents(vae) -> None:
    """shift_factor / scaling_factor from the VAE's own encodings of the bundled clips' frames, as real image VAEs
    were calibrated: the pipeline's (z - shift) * scale is then about N(0, 1)."""
    from ..data.video import decode_frames

    clips = sorted((Path(__file__).parent.parent / "demo" / "clips").glob("*.mp4"))
    frames = np.concatenate([decode_frames(clip, [i / 4 for i in range(4)], (64, 64)) for clip in clips])
    pixels = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    latents = vae.encode(pixels).latent_dist.mean
    vae.register_to_config(shift_factor=round(latents.mean().item(), 4), scaling_factor=round(1 / latents.std().item(), 4))


def _make_hunyuan_video(out: Path, seed: int) -> Path:
    """HunyuanVideo's layout: a causal 3D VAE (8x spatial, 4x temporal, 16 channels), a Llama text encoder read
    at its third-last layer after the prompt template, CLIP's pooled vector, and the guidance-distilled transformer."""
    from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline, HunyuanVideoTransformer3DModel
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    width = 32
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out / "tokenizer", model_max_length=512)  # the template's 95 cropped tokens + 256
    build_tokenizer(out / "tokenizer_2", model_max_length=77)
    llama = LlamaModel(LlamaConfig(vocab_size=256, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=3,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=1)).eval()
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=256, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                                        num_attention_heads=2, max_position_embeddings=77, pad_token_id=0, eos_token_id=1,
                                        bos_token_id=1)).eval()
    vae = AutoencoderKLHunyuanVideo(latent_channels=16, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
                                    norm_num_groups=4).eval()
    _calibrate_video_scale(vae)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=16, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=width, pooled_projection_dim=width,
        rope_axes_dim=(4, 6, 6),
    )
    HunyuanVideoPipeline(
        text_encoder=llama, tokenizer=AutoTokenizer.from_pretrained(out / "tokenizer"), transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=clip,
        tokenizer_2=AutoTokenizer.from_pretrained(out / "tokenizer_2"),
    ).save_pretrained(out)
    (out / "motiontune_tiny.json").write_text(json.dumps({"family": "hunyuan-video", "seed": seed}) + "\n")
    return out


@torch.no_grad()
def _calibrate_video_scale(vae) -> None:
    """scaling_factor from the VAE's own encodings of the bundled clips (HunyuanVideo scales without a shift)."""
    from ..data.video import decode_frames

    clips = sorted((Path(__file__).parent.parent / "demo" / "clips").glob("*.mp4"))
    latents = []
    for clip in clips:
        frames = decode_frames(clip, [i / 8 for i in range(9)], (64, 64))
        pixels = torch.from_numpy(frames).permute(3, 0, 1, 2).unsqueeze(0).float() / 127.5 - 1.0
        latents.append(vae.encode(pixels).latent_dist.mean)
    vae.register_to_config(scaling_factor=round(1 / torch.cat(latents).std().item(), 4))
