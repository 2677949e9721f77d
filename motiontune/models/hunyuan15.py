"""HunyuanVideo 1.5 (text-to-video and image-to-video), as the stock `HunyuanVideo15Pipeline` and
`HunyuanVideo15ImageToVideoPipeline` run it.

- Prompts: Qwen2.5-VL's text model reads the pipeline's chat template (its system message, then the prompt) padded
  to 1000 + 108 tokens; the first 108 are cropped and the hidden states are those of the third-last layer, with
  their mask. The ByT5 glyph encoder reads only the quoted text of a prompt (`Text "..."`), 256 tokens; a prompt
  without quotes gives zeros and an all-zero mask, as the pipeline does.
- Latents: the VAE's mean × `scaling_factor` (16x spatial, 4x temporal, 32 channels); frames 4n+1.
- The transformer's input is always 2C+1 channels: the noisy latents, the condition latents and a mask. Text-to-video
  passes zeros for both and zero image tokens (which the transformer then masks out). Training passes the text only
  up to the batch's longest prompt (`_trimmed`): the transformer masks padding out, so the prediction is the same.
- Image-to-video: the first frame alone through the VAE (its mode × scaling_factor) as the first latent frame of the
  condition (the rest zeros), a mask of 1 on that latent frame, and SigLIP's last hidden states of the first frame as
  image tokens. The condition channels are built when a clip is encoded and cached with its latents; the SigLIP
  embedding is cached beside them.
- Classifier-free guidance is real (not distilled): nothing about it enters training. t = 1000σ, target noise − x0.

One cached tensor per prompt: [Qwen tokens, Qwen width, ByT5 tokens, ByT5 width, Qwen embeds, Qwen mask, ByT5
embeds, ByT5 mask], flat float32, unpacked exactly in `predict` and `sample`.
"""

from __future__ import annotations

import functools
import re

from ..util.lazy import no_grad, np, torch
from .base import Conditioning, Expert, ModelFamily, SampleRequest, calibrate_scaling_factor, to_uint8
from .hunyuan import DOUBLE_BLOCKS, REFINER_BLOCKS, SWAPPED
from .layout import OriginalLayout
from .loading import ModelLoadError, load_part
from .packing import FORMAT as PACKED, pack, unpack

MODEL_TYPES = ("HUNYUAN_VIDEO_1_5", "HUNYUAN_VIDEO_1_5_I2V")
# The pipeline's own constants (HunyuanVideo15Pipeline.__init__): Qwen tokens after the crop, the crop, ByT5 tokens,
# and the zero image tokens of text-to-video.
QWEN_LENGTH, QWEN_CROP, BYT5_LENGTH, T2V_IMAGE_TOKENS = 1000, 108, 256, 729
HIDDEN_LAYERS_TO_SKIP = 2

_DEFAULT_TARGETS = re.compile(
    r"^transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2))$")

# The original layout ComfyUI reads. ComfyUI runs HunyuanVideo 1.5 on its HunyuanVideo model (the same double-stream
# and refiner blocks, with q, k and v fused as `img_attn_qkv` / `txt_attn_qkv`, plus `byt5_in`, `vision_in` and
# `cond_type_embedding`), and its LoRA key map for that model takes these names. (Tencent's own checkpoints keep q, k
# and v apart: `img_attn_q`, ...; ComfyUI fuses them.)
_OUTSIDE_BLOCKS = {
    "img_in.proj": "x_embedder.proj", "cond_type_embedding": "cond_type_embed",
    "time_in.mlp.0": "time_embed.timestep_embedder.linear_1", "time_in.mlp.2": "time_embed.timestep_embedder.linear_2",
    "time_r_in.mlp.0": "time_embed.timestep_embedder_r.linear_1",
    "time_r_in.mlp.2": "time_embed.timestep_embedder_r.linear_2",
    "txt_in.input_embedder": "context_embedder.proj_in",
    "txt_in.t_embedder.mlp.0": "context_embedder.time_text_embed.timestep_embedder.linear_1",
    "txt_in.t_embedder.mlp.2": "context_embedder.time_text_embed.timestep_embedder.linear_2",
    "txt_in.c_embedder.linear_1": "context_embedder.time_text_embed.text_embedder.linear_1",
    "txt_in.c_embedder.linear_2": "context_embedder.time_text_embed.text_embedder.linear_2",
    "byt5_in.layernorm": "context_embedder_2.norm", "byt5_in.fc1": "context_embedder_2.linear_1",
    "byt5_in.fc2": "context_embedder_2.linear_2", "byt5_in.fc3": "context_embedder_2.linear_3",
    "vision_in.proj.0": "image_embedder.norm_in", "vision_in.proj.1": "image_embedder.linear_1",
    "vision_in.proj.3": "image_embedder.linear_2", "vision_in.proj.4": "image_embedder.norm_out",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",  # (shift, scale): SWAPPED
}


class HunyuanVideo15Family(ModelFamily):
    MODEL_TYPES = MODEL_TYPES
    NAME = "HunyuanVideo 1.5"
    TINY_MODELS = ("hunyuan-video-1.5", "hunyuan-video-1.5-i2v")
    VAE_CLASS = "AutoencoderKLHunyuanVideo15"
    VAE_COMPRESSION = (16, 4)
    QUANTIZED_TEXT_ENCODER = True  # Qwen2.5-VL-7B is ~15 GB in bf16
    temporal_factor = 4
    spatial_multiple = 16  # the VAE's 16x; the transformer's patches are 1x1
    ENCODER_PARTS = {"vae": ("vae", "image_encoder", "feature_extractor"),
                     "text": ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")}
    TEXT_FORMAT = PACKED  # each prompt's tensors packed into one cached row
    IMAGE_ENCODER = ("SiglipVisionModel", "SiglipImageProcessor", "feature_extractor")  # image-to-video's
    ORIGINAL_LAYOUT = OriginalLayout("HunyuanVideo 1.5", _OUTSIDE_BLOCKS, (DOUBLE_BLOCKS, REFINER_BLOCKS), SWAPPED)

    @classmethod
    def first_frame(cls, model_type):
        return "required" if model_type == "HUNYUAN_VIDEO_1_5_I2V" else None

    @classmethod
    def config_problems(cls, config):
        problems = super().config_problems(config)
        if not config.video_config.use_temporal_attention:
            problems.append(f"  - video_config.use_temporal_attention = false: {config.model_type}'s blocks attend over "
                            "text and video tokens together; frame-local attention is built for WAN only. Remove the key")
        return problems

    def __init__(self, config, device):
        super().__init__(config, device)
        self.is_i2v = self.first_frame(config.model_type) == "required"
        self.encodes_first_frame = self.is_i2v  # SigLIP's embedding of the first frame
        self.glyph = None  # (ByT5 tokenizer, encoder): frozen, not one of `text_encoders()` (it reads quoted text only)

    # --- loading -------------------------------------------------------------------------------
    def load_transformers(self) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideo15Transformer3DModel

        self.scheduler = load_part(FlowMatchEulerDiscreteScheduler, self.config.base_model_name, "scheduler")
        self.transformer = self.load_transformer(HunyuanVideo15Transformer3DModel, "transformer", self.config.transformer)
        if self.transformer.config.use_meanflow:
            raise ModelLoadError(f"{self.config.base_model_name}: a step-distilled (MeanFlow) HunyuanVideo 1.5 transformer "
                                 "(use_meanflow: true) takes a second timestep motiontune does not train; use a 480p/720p "
                                 "T2V or I2V release")

    def load_text_encoder(self) -> None:
        from transformers import AutoTokenizer, ByT5Tokenizer, Qwen2_5_VLTextModel, T5EncoderModel

        base = self.config.base_model_name
        # ComfyUI's keys for these encoders
        self.encoders = {"qwen25_7b": (load_part(AutoTokenizer, base, "tokenizer"),
                                       self.load_text_model(Qwen2_5_VLTextModel, "text_encoder", quantize="layers"))}
        self.glyph = (load_part(ByT5Tokenizer, base, "tokenizer_2"), self.load_text_model(T5EncoderModel, "text_encoder_2"))

    def release_text_encoder(self) -> None:
        self.glyph = None
        super().release_text_encoder()

    # --- encoding ------------------------------------------------------------------------------
    def _encode(self, prompts: list[str]) -> torch.Tensor:
        from diffusers import HunyuanVideo15Pipeline
        from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import format_text_input

        tokenizer, qwen = self.encoders["qwen25_7b"]
        system = _system_message()
        inputs = tokenizer.apply_chat_template(format_text_input(prompts, system), add_generation_prompt=True, tokenize=True,
                                               return_dict=True, padding="max_length", max_length=QWEN_LENGTH + QWEN_CROP,
                                               truncation=True, return_tensors="pt")
        mask = inputs.attention_mask.to(self.device)
        hidden = qwen(input_ids=inputs.input_ids.to(self.device), attention_mask=mask,
                      output_hidden_states=True).hidden_states[-(HIDDEN_LAYERS_TO_SKIP + 1)]
        embeds, mask = hidden[:, QWEN_CROP:], mask[:, QWEN_CROP:]
        glyph_tokenizer, byt5 = self.glyph  # the pipeline's own glyph extraction (quoted text) and ByT5 call
        glyph, glyph_mask = HunyuanVideo15Pipeline._get_byt5_prompt_embeds(glyph_tokenizer, byt5, prompts, self.device,
                                                                           BYT5_LENGTH)
        return torch.stack([pack(embeds[i], mask[i], glyph[i], glyph_mask[i]) for i in range(len(prompts))])

    @staticmethod
    def _unpack(packed: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(B, N) → Qwen embeds (B, L, D), mask (B, L), ByT5 embeds (B, L2, D2), mask (B, L2); masks as integers."""
        embeds, mask, glyph, glyph_mask = unpack(packed)
        return embeds, mask.round().long(), glyph, glyph_mask.round().long()

    def _scaled_latents(self, pixels: torch.Tensor, mode: bool = False) -> torch.Tensor:
        return self.vae_latents(pixels, mode) * self.vae.config.scaling_factor

    @no_grad
    def encode_video(self, frames: np.ndarray) -> torch.Tensor:
        pixels = self.video_pixels(frames)
        latents = self._scaled_latents(pixels)
        if self.is_i2v:  # + the condition channels HunyuanVideo15ImageToVideoPipeline.prepare_cond_latents_and_mask builds
            condition = torch.zeros_like(latents)
            condition[:, :, :1] = self._scaled_latents(pixels[:, :, :1], mode=True)  # the first frame alone
            mask = torch.zeros_like(latents[:, :1])
            mask[:, :, 0] = 1.0
            latents = torch.cat([latents, condition, mask], dim=1)
        return latents[0].to("cpu")

    @no_grad
    def encode_first_frame(self, frame: np.ndarray) -> torch.Tensor:
        """As `HunyuanVideo15ImageToVideoPipeline._get_image_embeds`: SigLIP's last hidden states of the frame."""
        inputs = self.image_processor.preprocess(images=frame, do_resize=True, return_tensors="pt", do_convert_rgb=True)
        return self.image_encoder(**inputs.to(self.device)).last_hidden_state[0].to("cpu")

    def split_conditioning(self, stored, generator, image_embeds=None, extras=None):
        if not self.is_i2v:
            return stored, None
        channels = self.transformer.config.out_channels
        rows = torch.ones(len(stored), dtype=torch.bool)
        return stored[:, :channels], Conditioning(stored[:, channels:], rows, image_embeds=image_embeds)

    # --- training ------------------------------------------------------------------------------
    def trained_experts(self) -> list[Expert]:
        return [Expert("transformer", "", self.transformer, (0.0, 1.0))]

    def predict(self, noisy, sigma, text, expert, conditioning=None):
        embeds, mask, glyph, glyph_mask = _trimmed(*self._unpack(text.to(noisy.device, torch.float32)))
        dtype, config = self.weight_dtype, expert.module.config
        if conditioning is not None:
            extra = conditioning.latents.to(noisy.device, noisy.dtype)
            image = conditioning.image_embeds.to(noisy.device, dtype)
        else:  # text-to-video: zero condition latents and mask, and zero image tokens, which the transformer masks out
            extra = noisy.new_zeros(len(noisy), noisy.shape[1] + 1, *noisy.shape[2:])
            image = torch.zeros(len(noisy), 1, config.image_embed_dim, device=noisy.device, dtype=dtype)
        return expert.module(
            hidden_states=torch.cat([noisy, extra], dim=1).to(dtype), timestep=(sigma * 1000.0).to(dtype),
            encoder_hidden_states=embeds.to(dtype), encoder_attention_mask=mask, encoder_hidden_states_2=glyph.to(dtype),
            encoder_attention_mask_2=glyph_mask, image_embeds=image, return_dict=False,
        )[0]

    def fsdp_units(self, module):
        return list(module.transformer_blocks)

    # --- LoRA ----------------------------------------------------------------------------------
    def lora_may_adapt(self, name: str) -> bool:
        return name.startswith("transformer_blocks.")

    def lora_default_target(self, name: str) -> bool:
        return bool(_DEFAULT_TARGETS.match(name))

    def save_diffusers_lora(self, directory, weight_name, state_dict, adapter_metadata):
        """`transformer.`-prefixed peft names, as diffusers' pipelines save them. diffusers 0.42.1 has no LoRA loader
        for HunyuanVideo 1.5: the file loads with `pipe.transformer.load_lora_adapter(path, prefix="transformer")`,
        which does not read the file's adapter metadata, so alpha / rank is folded into lora_B and the metadata says
        alpha = rank: every reader applies the same update."""
        from diffusers.loaders.lora_base import LoraBaseMixin

        rank, alpha = adapter_metadata["r"], adapter_metadata["lora_alpha"]
        folded = {k: v * (alpha / rank) if ".lora_B." in k else v for k, v in state_dict.items()}
        metadata = {**adapter_metadata, "lora_alpha": rank}
        LoraBaseMixin._save_lora_weights(directory, {"transformer": folded}, {"transformer": metadata},
                                         weight_name=weight_name)

    # single_file_state_dict, comfy_lora_key / _parts: ORIGINAL_LAYOUT's, the layout ComfyUI reads

    def comfy_lora_keeps_alpha(self, peft_module_name: str) -> bool:
        """ComfyUI scales each entry by its `.alpha` (a fused entry's alpha grows with its stacked rank); diffusers has
        no reader of this layout to refuse one."""
        return True

    # --- sampling ------------------------------------------------------------------------------
    @no_grad
    def sample(self, request: SampleRequest) -> np.ndarray:
        """One video from the stock pipeline. Image-to-video: the pipeline picks the size from the image's aspect
        ratio and the transformer's `target_size` (it ignores height / width) and crops the image to it."""
        from diffusers import ClassifierFreeGuidance, HunyuanVideo15ImageToVideoPipeline, HunyuanVideo15Pipeline

        negative = request.negative_prompt_embeds
        guider = ClassifierFreeGuidance(guidance_scale=request.cfg_scale if negative is not None else 1.0)
        dtype = self.weight_dtype
        embeds, mask, glyph, glyph_mask = self._unpack(request.prompt_embeds.to(self.device, torch.float32))
        inputs = dict(prompt_embeds=embeds.to(dtype), prompt_embeds_mask=mask, prompt_embeds_2=glyph.to(dtype),
                      prompt_embeds_mask_2=glyph_mask)
        if negative is not None:
            embeds, mask, glyph, glyph_mask = self._unpack(negative.to(self.device, torch.float32))
            inputs.update(negative_prompt_embeds=embeds.to(dtype), negative_prompt_embeds_mask=mask,
                          negative_prompt_embeds_2=glyph.to(dtype), negative_prompt_embeds_mask_2=glyph_mask)
        with self.taking_turns(first_frame=request.image is not None):
            parts = dict(text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                         transformer=self.transformer, vae=self.vae, scheduler=self.scheduler, guider=guider)
            if request.image is not None:
                from PIL import Image

                pipeline = HunyuanVideo15ImageToVideoPipeline(image_encoder=self.image_encoder,
                                                              feature_extractor=self.image_processor, **parts)
                inputs["image"] = Image.fromarray(request.image)
            else:
                pipeline = HunyuanVideo15Pipeline(**parts)
                inputs.update(height=request.height, width=request.width)
            pipeline.set_progress_bar_config(disable=True)
            video = pipeline(**inputs, num_frames=request.frames, num_inference_steps=request.steps, output_type="np",
                             generator=torch.Generator(device=self.device).manual_seed(request.seed)).frames[0]
        return to_uint8(video)

    # --- tiny models (motiontune.testing) --------------------------------------------------------------
    @classmethod
    def tiny_pipeline(cls, name, tokenizer, clips, heads, layers):
        """HunyuanVideo 1.5's layout: the 16x / 4x VAE (scaling_factor measured on the clips), Qwen2.5-VL's text model
        behind the chat template, the ByT5 glyph encoder, SigLIP for image-to-video, and the transformer whose
        input is latents + condition + mask. `target_size` 64: the image-to-video pipeline sizes a square image's
        video 64 x 64."""
        from diffusers import (AutoencoderKLHunyuanVideo15, ClassifierFreeGuidance, FlowMatchEulerDiscreteScheduler,
                               HunyuanVideo15ImageToVideoPipeline, HunyuanVideo15Pipeline, HunyuanVideo15Transformer3DModel)
        from transformers import (ByT5Tokenizer, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, SiglipImageProcessor,
                                  SiglipVisionConfig, SiglipVisionModel, T5Config, T5EncoderModel)

        width, channels = 32, 8
        qwen_tokenizer = _tiny_qwen_tokenizer(tokenizer("tokenizer", QWEN_LENGTH + QWEN_CROP))
        qwen = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(
            vocab_size=256, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=3, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=2048, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
            pad_token_id=0, bos_token_id=1, eos_token_id=1)).eval()
        byt5 = T5EncoderModel(T5Config(vocab_size=384, d_model=width, d_kv=8, d_ff=2 * width, num_layers=1, num_heads=4,
                                       relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1)).eval()
        vae = AutoencoderKLHunyuanVideo15(latent_channels=channels, block_out_channels=(8, 8, 16, 16, 16),
                                          layers_per_block=1).eval()
        calibrate_scaling_factor(vae, clips)
        transformer = HunyuanVideo15Transformer3DModel(
            in_channels=2 * channels + 1, out_channels=channels, num_attention_heads=heads or 2, attention_head_dim=16,
            num_layers=layers, num_refiner_layers=1, text_embed_dim=width, text_embed_2_dim=width, image_embed_dim=width,
            rope_axes_dim=(4, 6, 6), target_size=64, task_type="i2v" if name.endswith("i2v") else "t2v")
        parts = dict(text_encoder=qwen, tokenizer=qwen_tokenizer, transformer=transformer, vae=vae,
                     scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), text_encoder_2=byt5, tokenizer_2=ByT5Tokenizer(),
                     guider=ClassifierFreeGuidance(guidance_scale=6.0))
        if not name.endswith("i2v"):
            return HunyuanVideo15Pipeline(**parts)
        siglip = SiglipVisionModel(SiglipVisionConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                                                      num_attention_heads=2, image_size=32, patch_size=8)).eval()
        return HunyuanVideo15ImageToVideoPipeline(image_encoder=siglip, feature_extractor=SiglipImageProcessor(
            size={"height": 32, "width": 32}), **parts)

    # --- what estimate needs to know (motiontune/estimate asks; nothing here loads weights) ----------------------
    transformer_class_name = "HunyuanVideo15Transformer3DModel"
    block_groups = (("num_layers", "transformer_blocks"),)
    text_tokens = QWEN_LENGTH
    TEXT_ENCODER_CLASSES = {"text_encoder": ("Qwen2.5-VL", "Qwen2_5_VLTextModel"), "text_encoder_2": ("ByT5", "T5EncoderModel")}

    def estimate_release(self, base: str) -> tuple[str, dict[str, dict]]:
        """(Hub id, its parts' configs): the 480p release of this model type, whatever `base` names."""
        name = RELEASE_NAMES[self.config.model_type]
        return name, RELEASE

    def estimate_prepare(self, transformer: torch.nn.Module) -> None:
        """A fake copy whose forward can run: the transformer sorts every text and image token by its mask (boolean
        selections, whose sizes depend on the data), and asks whether the image tokens are all zero (text-to-video).
        Within its forward every token counts as valid, the costliest case (`_every_token_valid`)."""
        forward, text_to_video = transformer.forward, not self.is_i2v

        def every_token_valid(*args, **kwargs):
            with _every_token_valid()(text_to_video):
                return forward(*args, **kwargs)

        transformer.forward = every_token_valid

    def _estimate_text(self, batch: int, cfg: dict) -> torch.Tensor:
        row = pack(torch.zeros(QWEN_LENGTH, cfg["text_embed_dim"]), torch.ones(QWEN_LENGTH),
                         torch.zeros(BYT5_LENGTH, cfg["text_embed_2_dim"]), torch.ones(BYT5_LENGTH))
        return row.expand(batch, -1).clone()

    def estimate_step_inputs(self, cfg: dict, x0: torch.Tensor, dtype: torch.dtype):
        """(cached text rows, conditioning) of a training batch like `x0`."""
        text = self._estimate_text(len(x0), cfg)
        if not self.is_i2v:
            return text, None
        batch, channels, frames, height, width = x0.shape
        latents = x0.new_empty(batch, channels + 1, frames, height, width)
        images = x0.new_empty(batch, SIGLIP_TOKENS, cfg["image_embed_dim"])
        return text, Conditioning(latents, torch.ones(batch, dtype=torch.bool), image_embeds=images)

    def estimate_sample_call(self, cfg: dict, latent: tuple[int, int, int], dtype: torch.dtype) -> dict:
        """One transformer call as the stock pipeline makes it while sampling (batch 1: the guider runs the
        conditional and unconditional passes one after the other)."""
        tokens = SIGLIP_TOKENS if self.is_i2v else T2V_IMAGE_TOKENS
        return {"hidden_states": torch.empty(1, cfg["in_channels"], *latent, dtype=dtype),
                "timestep": torch.empty(1, dtype=dtype),
                "encoder_hidden_states": torch.empty(1, QWEN_LENGTH, cfg["text_embed_dim"], dtype=dtype),
                "encoder_attention_mask": torch.ones(1, QWEN_LENGTH),
                "encoder_hidden_states_2": torch.empty(1, BYT5_LENGTH, cfg["text_embed_2_dim"], dtype=dtype),
                "encoder_attention_mask_2": torch.ones(1, BYT5_LENGTH),
                "image_embeds": torch.ones(1, tokens, cfg["image_embed_dim"], dtype=dtype)}

    def estimate_vae(self, cfg: dict) -> torch.nn.Module:
        """The VAE as the base builds it, its attention blocks making their causal mask a frame at a time: the same
        tensor, which diffusers fills a token's row at a time (on fake tensors that is ops by the hundred thousand for
        one clip: the bulk of an estimate's time)."""
        vae = super().estimate_vae(cfg)
        for module in vae.modules():
            if hasattr(module, "prepare_causal_attention_mask"):
                module.prepare_causal_attention_mask = frame_causal_mask
        return vae

    def estimate_image_encoder_bytes(self) -> int:
        """Image-to-video's SigLIP so400m vision tower, float32, beside the VAE while clips and first frames encode."""
        return 4 * SIGLIP_PARAMS if self.is_i2v else 0

    def estimate_first_frame(self, frames: int) -> int:
        """Frames the pipeline encodes for a sample's first frame: that frame alone."""
        return 1


def frame_causal_mask(n_frame: int, n_hw: int, dtype, device, batch_size: int | None = None) -> torch.Tensor:
    """HunyuanVideo15AttnBlock.prepare_causal_attention_mask made a frame at a time: a token sees the tokens of its
    own frame and of the frames before it (0), not later ones (-inf)."""
    mask = torch.full((n_frame * n_hw, n_frame * n_hw), float("-inf"), dtype=dtype, device=device)
    for frame in range(n_frame):
        mask[frame * n_hw:(frame + 1) * n_hw, :(frame + 1) * n_hw] = 0
    return mask if batch_size is None else mask.unsqueeze(0).expand(batch_size, -1, -1)


def _trimmed(embeds, mask, glyph, glyph_mask):
    """The text streams cut after the batch's longest prompt (at least one token). The transformer masks padding
    out of every attention and zeroes it, so the prediction is the full-length call's (1000 + 256 tokens, and 729
    zero image tokens for text-to-video, as the pipeline passes them: tests/test_hunyuan15.py) at a fraction of the
    attention's cost. Both tokenizers pad on the right."""
    keep = max(1, int(mask.sum(1).max()))
    keep_glyph = max(1, int(glyph_mask.sum(1).max()))
    return embeds[:, :keep], mask[:, :keep], glyph[:, :keep_glyph], glyph_mask[:, :keep_glyph]


@functools.cache
def _every_token_valid() -> type:
    """For fake tensors (estimate), where masks have no values: a selection by a boolean mask takes every row, by the
    mask's inverse none, and `torch.all` (the transformer's test for text-to-video) answers `text_to_video`. Every
    token then takes part, as in a batch of prompts that fill the pipeline's lengths. (The mode's class is made on first
    use: its base is torch's, which `motiontune inspect` does not import.)"""

    class EveryTokenValid(torch.overrides.TorchFunctionMode):
        class _Inverse:
            pass

        def __init__(self, text_to_video: bool):
            super().__init__()
            self.text_to_video = text_to_video

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.Tensor.__invert__ and args[0].dtype == torch.bool:
                return self._Inverse()
            if func is torch.Tensor.__getitem__ and isinstance(args[1], self._Inverse):
                return args[0][:0]
            if func is torch.Tensor.__getitem__ and isinstance(args[1], torch.Tensor) and args[1].dtype == torch.bool:
                return args[0]
            if func is torch.all:
                return self.text_to_video
            return func(*args, **kwargs)

    return EveryTokenValid


def _system_message() -> str:
    """The pipeline's system message, exactly (it is set in HunyuanVideo15Pipeline.__init__, whose parts we need not
    build to read it: the default of the static `_get_mllm_prompt_embeds` is the same string)."""
    import inspect

    from diffusers import HunyuanVideo15Pipeline

    return inspect.signature(HunyuanVideo15Pipeline._get_mllm_prompt_embeds).parameters["system_message"].default


# Qwen2's chat template, as Qwen2.5-VL's tokenizer carries it (text messages only); FILLER: see _tiny_qwen_tokenizer
_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['role'] == 'system' %}FILLER{% endif %}"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _tiny_qwen_tokenizer(tokenizer):
    """The tiny word-level tokenizer with Qwen2's chat template. Real Qwen2.5-VL tokenizes the template up to the
    prompt into exactly the 108 tokens the pipeline crops; a word-level tokenizer makes fewer, so the tiny template
    repeats `<pad>` after the system header until the prompt starts at token 108 too (else the crop would cut the
    prompt away)."""
    tokenizer.padding_side = "right"
    tokenizer.chat_template = _CHAT_TEMPLATE.replace("FILLER", "")
    marker = tokenizer.convert_tokens_to_ids("rabbit")
    messages = [[{"role": "system", "content": _system_message()}, {"role": "user", "content": "rabbit"}]]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"][0]
    missing = QWEN_CROP - ids.index(marker)
    if missing < 0:
        raise ValueError(f"the tiny tokenizer makes {ids.index(marker)} template tokens, more than the {QWEN_CROP} cropped")
    tokenizer.chat_template = _CHAT_TEMPLATE.replace("FILLER", " <pad>" * missing)
    return tokenizer


# --- the released models, for `motiontune estimate` on a Hub id not on this machine ---------------------------------
RELEASE_NAMES = {"HUNYUAN_VIDEO_1_5": "hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v",
                 "HUNYUAN_VIDEO_1_5_I2V": "hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_i2v"}
SIGLIP_TOKENS = 729  # SigLIP so400m-patch14-384: (384 / 14)² patches
SIGLIP_PARAMS = 428_225_600  # its vision tower
# The 480p releases (T2V and I2V have the same architecture; 720p differs only in target_size and the scheduler's shift)
RELEASE = {
    "transformer": {"in_channels": 65, "out_channels": 32, "num_attention_heads": 16, "attention_head_dim": 128,
                    "num_layers": 54, "num_refiner_layers": 2, "mlp_ratio": 4.0, "patch_size": 1, "patch_size_t": 1,
                    "qk_norm": "rms_norm", "text_embed_dim": 3584, "text_embed_2_dim": 1472, "image_embed_dim": 1152,
                    "rope_theta": 256.0, "rope_axes_dim": [16, 56, 56], "target_size": 640, "use_meanflow": False},
    "vae": {"latent_channels": 32, "block_out_channels": [128, 256, 512, 1024, 1024], "layers_per_block": 2,
            "spatial_compression_ratio": 16, "temporal_compression_ratio": 4, "scaling_factor": 1.03682},
    # Qwen2.5-VL-7B-Instruct's text model, and the Glyph-SDXL-v2 ByT5-small encoder
    "text_encoder": {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                     "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 128000,
                     "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
                     "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}},
    "text_encoder_2": {"vocab_size": 1510, "d_model": 1472, "d_kv": 64, "d_ff": 3584, "num_layers": 12, "num_heads": 6,
                       "feed_forward_proj": "gated-gelu"},
}
