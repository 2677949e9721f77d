"""HunyuanVideo (text-to-video), as the stock `HunyuanVideoPipeline` runs it.

- Prompts: the Llama text encoder reads the pipeline's prompt template around the prompt, and the
  pipeline's crop removes the template's leading tokens; the hidden states are those of the third-last layer
  (`num_hidden_layers_to_skip` 2), with their attention mask. CLIP gives the pooled vector.
- Guidance: HunyuanVideo is guidance-distilled; the transformer takes the guidance value × 1000, in training
  as at inference (`guidance_scale` in the config, 1.0 by default, is what to sample with).
- Latents: the VAE's mean × `scaling_factor` (the pipeline divides by it before decoding).
- The flow target and timestep scale are the shared ones (velocity noise − x0, t = 1000σ).

One tensor per prompt (the text cache and the loop carry one): [tokens, width, pooled width, embeds (L×D),
mask (L), pooled (P)], flat float32, unpacked exactly in `predict` and `sample`.
"""

from __future__ import annotations

from ..util.lazy import no_grad, np, torch
from .base import Expert, ModelFamily, SampleRequest, calibrate_scaling_factor, to_uint8
from .layout import OriginalLayout
from .loading import load_part
from .packing import FORMAT as PACKED, pack, unpack

MAX_SEQUENCE_LENGTH = 256  # the pipeline's default (after the template's crop)
HIDDEN_LAYERS_TO_SKIP = 2
CLIP_LENGTH = 77

_DEFAULT_TARGETS = (".attn.to_q", ".attn.to_k", ".attn.to_v", ".attn.to_out.0", ".attn.add_q_proj", ".attn.add_k_proj",
                    ".attn.add_v_proj", ".attn.to_add_out", ".ff.net.0.proj", ".ff.net.2", ".ff_context.net.0.proj",
                    ".ff_context.net.2", ".proj_mlp", ".proj_out")

# The original (and ComfyUI) HunyuanVideo layout, block by block: original module → the diffusers module(s) it holds.
# A fused original module holds several, stacked along the output dimension in the order given.
_DOUBLE_BLOCK = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn_proj": ("attn.to_out.0",), "txt_attn_proj": ("attn.to_add_out",),
    "img_attn_q_norm": ("attn.norm_q",), "img_attn_k_norm": ("attn.norm_k",),
    "txt_attn_q_norm": ("attn.norm_added_q",), "txt_attn_k_norm": ("attn.norm_added_k",),
    "img_mod.linear": ("norm1.linear",), "txt_mod.linear": ("norm1_context.linear",),
    "img_mlp.fc1": ("ff.net.0.proj",), "img_mlp.fc2": ("ff.net.2",),
    "txt_mlp.fc1": ("ff_context.net.0.proj",), "txt_mlp.fc2": ("ff_context.net.2",),
}
_SINGLE_BLOCK = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),  # q, k, v and the MLP input in one matrix
    "linear2": ("proj_out",), "q_norm": ("attn.norm_q",), "k_norm": ("attn.norm_k",), "modulation.linear": ("norm.linear",),
}
_REFINER_BLOCK = {
    "self_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"), "self_attn_proj": ("attn.to_out.0",),
    "norm1": ("norm1",), "norm2": ("norm2",), "mlp.fc1": ("ff.net.0.proj",), "mlp.fc2": ("ff.net.2",),
    "adaLN_modulation.1": ("norm_out.linear",),
}
# (original blocks, diffusers blocks, table), as OriginalLayout reads them; HunyuanVideo 1.5's blocks are these too
DOUBLE_BLOCKS = ("double_blocks", "transformer_blocks", _DOUBLE_BLOCK)
REFINER_BLOCKS = ("txt_in.individual_token_refiner.blocks", "context_embedder.token_refiner.refiner_blocks", _REFINER_BLOCK)
SWAPPED = ("final_layer.adaLN_modulation.1",)  # (shift, scale) where diffusers keeps (scale, shift)
_OUTSIDE_BLOCKS = {
    "img_in.proj": "x_embedder.proj",
    "txt_in.input_embedder": "context_embedder.proj_in",
    "txt_in.t_embedder.mlp.0": "context_embedder.time_text_embed.timestep_embedder.linear_1",
    "txt_in.t_embedder.mlp.2": "context_embedder.time_text_embed.timestep_embedder.linear_2",
    "txt_in.c_embedder.linear_1": "context_embedder.time_text_embed.text_embedder.linear_1",
    "txt_in.c_embedder.linear_2": "context_embedder.time_text_embed.text_embedder.linear_2",
    "time_in.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "time_in.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "guidance_in.mlp.0": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.mlp.2": "time_text_embed.guidance_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",  # (shift, scale): SWAPPED
}


class HunyuanVideoFamily(ModelFamily):
    MODEL_TYPES = ("HUNYUAN_VIDEO",)
    NAME = "HunyuanVideo"
    TINY_MODELS = ("hunyuan-video",)
    LORA_PIPELINE = "HunyuanVideoPipeline"
    VAE_CLASS = "AutoencoderKLHunyuanVideo"
    GUIDANCE_EMBEDDING = True
    temporal_factor = 4
    spatial_multiple = 16  # the VAE's 8x, times the transformer's 2x2 patches
    ENCODER_PARTS = {"vae": ("vae",), "text": ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")}
    TEXT_FORMAT = PACKED  # each prompt's tensors packed into one cached row
    ORIGINAL_LAYOUT = OriginalLayout("HunyuanVideo", _OUTSIDE_BLOCKS, (
        DOUBLE_BLOCKS, ("single_blocks", "single_transformer_blocks", _SINGLE_BLOCK), REFINER_BLOCKS), SWAPPED)

    def __init__(self, config, device):
        super().__init__(config, device)
        self.guidance = config.guidance_scale

    # --- loading -------------------------------------------------------------------------------
    def load_transformers(self) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoTransformer3DModel

        self.scheduler = load_part(FlowMatchEulerDiscreteScheduler, self.config.base_model_name, "scheduler")
        self.transformer = self.load_transformer(HunyuanVideoTransformer3DModel, "transformer", self.config.transformer)

    def load_text_encoder(self) -> None:
        from transformers import AutoTokenizer, CLIPTextModel, LlamaModel

        self.encoders = {name: (load_part(AutoTokenizer, self.config.base_model_name, f"tokenizer{index}"),
                                self.load_text_model(cls, f"text_encoder{index}"))
                         for name, index, cls in (("llama", "", LlamaModel), ("clip_l", "_2", CLIPTextModel))}

    # --- encoding ------------------------------------------------------------------------------
    def _encode(self, prompts: list[str]) -> torch.Tensor:
        from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

        tokenizer, llama = self.encoders["llama"]
        crop = DEFAULT_PROMPT_TEMPLATE["crop_start"]
        inputs = tokenizer([DEFAULT_PROMPT_TEMPLATE["template"].format(p) for p in prompts], max_length=MAX_SEQUENCE_LENGTH + crop,
                           padding="max_length", truncation=True, return_tensors="pt").to(self.device)
        hidden = llama(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                       output_hidden_states=True).hidden_states[-(HIDDEN_LAYERS_TO_SKIP + 1)]
        embeds, mask = hidden[:, crop:], inputs.attention_mask[:, crop:]
        clip_tokenizer, clip = self.encoders["clip_l"]
        ids = clip_tokenizer(prompts, padding="max_length", max_length=CLIP_LENGTH, truncation=True, return_tensors="pt").input_ids
        pooled = clip(ids.to(self.device), output_hidden_states=False).pooler_output
        return torch.stack([pack(embeds[i], mask[i], pooled[i]) for i in range(len(prompts))])

    @staticmethod
    def _unpack(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N) → embeds (B, L, D), attention mask (B, L) as integers, pooled (B, P)."""
        embeds, mask, pooled = unpack(packed)
        return embeds, mask.round().long(), pooled

    @no_grad
    def encode_video(self, frames: np.ndarray) -> torch.Tensor:
        latents = self.vae_latents(self.video_pixels(frames)) * self.vae.config.scaling_factor
        return latents[0].to("cpu")

    # --- training ------------------------------------------------------------------------------
    def trained_experts(self) -> list[Expert]:
        return [Expert("transformer", "", self.transformer, (0.0, 1.0))]

    def predict(self, noisy, sigma, text, expert, conditioning=None):
        embeds, mask, pooled = self._unpack(text.to(noisy.device, torch.float32))
        dtype = self.weight_dtype
        # the guidance embedding takes the value × 1000, as HunyuanVideoPipeline passes it
        guidance = torch.full((len(noisy),), self.guidance * 1000.0, device=noisy.device, dtype=dtype)
        return expert.module(
            hidden_states=noisy.to(dtype), timestep=(sigma * 1000.0).to(dtype), encoder_hidden_states=embeds.to(dtype),
            encoder_attention_mask=mask, pooled_projections=pooled.to(dtype), guidance=guidance, return_dict=False,
        )[0]

    def fsdp_units(self, module):
        return list(module.transformer_blocks) + list(module.single_transformer_blocks)

    def lora_may_adapt(self, name: str) -> bool:
        return name.startswith(("transformer_blocks.", "single_transformer_blocks."))

    def lora_default_target(self, name: str) -> bool:
        return name.endswith(_DEFAULT_TARGETS)

    def save_diffusers_lora(self, directory, weight_name, state_dict, adapter_metadata):
        from diffusers import HunyuanVideoPipeline

        HunyuanVideoPipeline.save_lora_weights(directory, transformer_lora_layers=state_dict, weight_name=weight_name,
                                               transformer_lora_adapter_metadata=adapter_metadata)

    # single_file_state_dict, comfy_lora_key / _parts: ORIGINAL_LAYOUT's, what diffusers' single-file converter
    # (`from_single_file`) turns back into this model

    def comfy_lora_keeps_alpha(self, peft_module_name: str) -> bool:
        """diffusers' HunyuanVideo loader refuses a LoRA with any `.alpha` key (and its converter cannot split one
        for a fused module), so the file carries alpha / rank folded into lora_B."""
        return False

    # --- sampling ------------------------------------------------------------------------------
    @no_grad
    def sample(self, request: SampleRequest) -> np.ndarray:
        from diffusers import HunyuanVideoPipeline

        self.load_vae()
        pipeline = HunyuanVideoPipeline(text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                        transformer=self.transformer, vae=self.vae, scheduler=self.scheduler)
        pipeline.set_progress_bar_config(disable=True)
        dtype = self.weight_dtype
        embeds, mask, pooled = self._unpack(request.prompt_embeds.to(self.device, torch.float32))
        inputs = dict(prompt_embeds=embeds.to(dtype), prompt_attention_mask=mask, pooled_prompt_embeds=pooled.to(dtype))
        if request.negative_prompt_embeds is not None:  # true classifier-free guidance
            embeds, mask, pooled = self._unpack(request.negative_prompt_embeds.to(self.device, torch.float32))
            inputs.update(negative_prompt_embeds=embeds.to(dtype), negative_prompt_attention_mask=mask,
                          negative_pooled_prompt_embeds=pooled.to(dtype), true_cfg_scale=request.cfg_scale)
        try:
            video = pipeline(**inputs, height=request.height, width=request.width, num_frames=request.frames,
                             num_inference_steps=request.steps, guidance_scale=self.guidance,
                             generator=torch.Generator(device=self.device).manual_seed(request.seed), output_type="np").frames[0]
        finally:
            self.park_vae()
        return to_uint8(video)

    # --- tiny models (motiontune.testing) --------------------------------------------------------------
    @classmethod
    def tiny_pipeline(cls, name, tokenizer, clips, heads, layers):
        """HunyuanVideo's layout: a causal 3D VAE (8x spatial, 4x temporal, 16 channels), a Llama text encoder read
        at its third-last layer after the prompt template, CLIP's pooled vector, and the guidance-distilled
        transformer."""
        from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline, HunyuanVideoTransformer3DModel
        from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

        width = 32
        llama = LlamaModel(LlamaConfig(vocab_size=256, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=3,
                                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                                       pad_token_id=0, bos_token_id=1, eos_token_id=1)).eval()
        clip = CLIPTextModel(CLIPTextConfig(vocab_size=256, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                                            num_attention_heads=2, max_position_embeddings=77, pad_token_id=0, eos_token_id=1,
                                            bos_token_id=1)).eval()
        vae = AutoencoderKLHunyuanVideo(latent_channels=16, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
                                        norm_num_groups=4).eval()
        calibrate_scaling_factor(vae, clips)
        transformer = HunyuanVideoTransformer3DModel(
            in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=16, num_layers=1, num_single_layers=1,
            num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=width, pooled_projection_dim=width,
            rope_axes_dim=(4, 6, 6),
        )
        return HunyuanVideoPipeline(
            text_encoder=llama, tokenizer=tokenizer("tokenizer", 512), transformer=transformer, vae=vae,  # 95 template tokens + 256
            scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=clip, tokenizer_2=tokenizer("tokenizer_2", 77),
        )

    # --- what estimate needs to know (motiontune/estimate asks; nothing here loads weights) ----------------------
    transformer_class_name = "HunyuanVideoTransformer3DModel"
    block_groups = (("num_layers", "transformer_blocks"), ("num_single_layers", "single_transformer_blocks"))
    text_tokens = MAX_SEQUENCE_LENGTH
    TEXT_ENCODER_CLASSES = {"text_encoder": ("Llama", "LlamaModel"), "text_encoder_2": ("CLIP-L", "CLIPTextModel")}

    def estimate_release(self, base: str) -> tuple[str, dict[str, dict]]:
        """(Hub id, its parts' configs): the one release, whatever `base` names."""
        return RELEASE_NAME, RELEASE

    def _estimate_text(self, batch: int, cfg: dict) -> torch.Tensor:
        width = cfg["text_embed_dim"]
        row = pack(torch.zeros(MAX_SEQUENCE_LENGTH, width), torch.ones(MAX_SEQUENCE_LENGTH),
                         torch.zeros(cfg["pooled_projection_dim"]))
        return row.expand(batch, -1).clone()

    def estimate_step_inputs(self, cfg: dict, x0: torch.Tensor, dtype: torch.dtype):
        """(cached text rows, conditioning) of a training batch like `x0`: real text rows, as `predict` reads their
        header; no conditioning (text-to-video)."""
        return self._estimate_text(len(x0), cfg), None

    def estimate_sample_call(self, cfg: dict, latent: tuple[int, int, int], dtype: torch.dtype) -> dict:
        """One transformer call as the stock pipeline makes it while sampling (batch 1: guidance is distilled)."""
        return {"hidden_states": torch.empty(1, cfg["in_channels"], *latent, dtype=dtype), "timestep": torch.empty(1),
                "encoder_hidden_states": torch.empty(1, MAX_SEQUENCE_LENGTH, cfg["text_embed_dim"], dtype=dtype),
                "encoder_attention_mask": torch.ones(1, MAX_SEQUENCE_LENGTH, dtype=torch.long),
                "pooled_projections": torch.empty(1, cfg["pooled_projection_dim"], dtype=dtype),
                "guidance": torch.empty(1, dtype=dtype)}


# --- the released model, for `motiontune estimate` on a Hub id not on this machine ---------------------------------
RELEASE_NAME = "hunyuanvideo-community/HunyuanVideo"
RELEASE = {
    "transformer": {"in_channels": 16, "out_channels": 16, "num_attention_heads": 24, "attention_head_dim": 128,
                    "num_layers": 20, "num_single_layers": 40, "num_refiner_layers": 2, "mlp_ratio": 4.0,
                    "patch_size": 2, "patch_size_t": 1, "qk_norm": "rms_norm", "guidance_embeds": True,
                    "text_embed_dim": 4096, "pooled_projection_dim": 768, "rope_theta": 256.0,
                    "rope_axes_dim": [16, 56, 56]},
    "vae": {"latent_channels": 16, "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
            "temporal_compression_ratio": 4, "spatial_compression_ratio": 8, "scaling_factor": 0.476986},
    # the text part of llava-llama-3-8b, and CLIP ViT-L/14's text tower
    "text_encoder": {"vocab_size": 128320, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 8192,
                     "rms_norm_eps": 1e-05, "rope_theta": 500000.0},
    "text_encoder_2": {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                       "num_attention_heads": 12, "max_position_embeddings": 77, "projection_dim": 768},
}
