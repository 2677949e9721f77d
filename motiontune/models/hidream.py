"""HiDream-I1 (Full, Dev, Fast): an image model, trained on images and on single frames taken from videos.

As the stock `HiDreamImagePipeline` runs it:
- four text encoders: two CLIP models (their projected pooled outputs, concatenated), T5 (last hidden
  state) and Llama 3.1 (every layer's hidden states; the transformer reads the layers its config's
  `llama_layers` names). No attention mask reaches the transformer: padded tokens count, as at inference.
- latents are the VAE's (`latent_dist` mean), shifted and scaled as the pipeline undoes them:
  (z - shift_factor) × scaling_factor.
- the transformer's output is the negative of the flow velocity (the pipeline negates it before the
  scheduler step), so `predict` negates it too, and the shared flow target (noise − x0) applies.
- the MoE gates' auxiliary loss is switched off for training: diffusers computes it in training mode and
  never uses it, which costs memory every step.

One tensor per prompt: the text cache and the training loop carry one tensor per prompt, so the three
embeddings are packed into one flat float32 vector, [T5 tokens, Llama tokens, T5 (L×D), Llama used layers
(K×L×D), pooled], and unpacked exactly in `predict` and `sample`.
"""

from __future__ import annotations

import logging

from ..util.lazy import no_grad, np, torch
from .base import Expert, ModelFamily, SampleRequest, to_uint8
from .loading import load_part
from .packing import FORMAT as PACKED, pack, unpack

log = logging.getLogger("motiontune")

MAX_SEQUENCE_LENGTH = 128  # the pipeline's default for T5 and Llama
CLIP_MAX_LENGTH = 128  # the pipeline pads CLIP prompts to min(max_sequence_length, 218)

# Default LoRA targets: attention projections (image and text streams) and every expert's feed-forward.
_DEFAULT_TARGETS = (".attn1.to_q", ".attn1.to_k", ".attn1.to_v", ".attn1.to_out", ".ff_i.", ".ff_t.")


class HiDreamFamily(ModelFamily):
    MODEL_TYPES = ("HI_DREAM_FULL", "HI_DREAM_DEV", "HI_DREAM_FAST")
    NAME = "HiDream"
    TINY_MODELS = ("hi-dream",)
    LORA_PIPELINE = "HiDreamImagePipeline"
    VAE_CLASS = "AutoencoderKL"
    VIDEO_VAE = False  # an image model: frames are encoded one by one
    temporal_factor = 1
    frame_rule = "HiDream-I1 is an image model: one frame per clip"
    ENCODER_PARTS = {
        "vae": ("vae",),
        "text": ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "tokenizer_3", "text_encoder_3",
                 "tokenizer_4", "text_encoder_4"),
    }
    TEXT_FORMAT = PACKED  # each prompt's tensors packed into one cached row

    def __init__(self, config, device):
        super().__init__(config, device)
        log.info("%s is an image model: it trains on images and on single frames taken from the videos "
                 "(one frame per planned clip)", config.model_type)

    def valid_frame_count(self, frames: int) -> int:
        return min(frames, 1)

    @property
    def spatial_multiple(self) -> int:
        return 16  # the VAE's 8x, times the transformer's 2x2 patches

    # --- loading -------------------------------------------------------------------------------
    def load_transformers(self) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler, HiDreamImageTransformer2DModel

        self.scheduler = load_part(FlowMatchEulerDiscreteScheduler, self.config.base_model_name, "scheduler")
        self.transformer = self.load_transformer(HiDreamImageTransformer2DModel, "transformer", self.config.transformer)
        for module in self.transformer.modules():  # see the module docstring: an unused, costly auxiliary loss
            if type(module).__name__ == "MoEGate":
                module.alpha = 0.0

    def load_text_encoder(self) -> None:
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, LlamaForCausalLM, T5EncoderModel

        base = self.config.base_model_name
        encoders = {}  # keyed by ComfyUI's names for HiDream's four encoders
        for name, index, cls in (("clip_l", "", CLIPTextModelWithProjection), ("clip_g", "_2", CLIPTextModelWithProjection),
                                 ("t5", "_3", T5EncoderModel), ("llama", "_4", LlamaForCausalLM)):
            tokenizer = load_part(AutoTokenizer, base, f"tokenizer{index}")
            encoders[name] = (tokenizer, self.load_text_model(cls, f"text_encoder{index}"))
        encoders["llama"][0].pad_token = encoders["llama"][0].eos_token  # as the pipeline sets it
        self.encoders = encoders

    # --- encoding ------------------------------------------------------------------------------
    def _encode(self, prompts: list[str]) -> torch.Tensor:
        pooled = torch.cat([self._clip_pooled(*self.encoders[i], prompts) for i in ("clip_l", "clip_g")], dim=-1)
        t5_tokenizer, t5 = self.encoders["t5"]
        inputs = self._tokenize(t5_tokenizer, prompts, min(MAX_SEQUENCE_LENGTH, t5_tokenizer.model_max_length))
        t5_states = t5(inputs.input_ids, attention_mask=inputs.attention_mask)[0]
        llama_tokenizer, llama = self.encoders["llama"]
        inputs = self._tokenize(llama_tokenizer, prompts, min(MAX_SEQUENCE_LENGTH, llama_tokenizer.model_max_length))
        hidden = llama(inputs.input_ids, attention_mask=inputs.attention_mask, output_hidden_states=True).hidden_states[1:]
        used = torch.stack([hidden[k] for k in self._llama_layers()], dim=1)  # (B, K, L, D): only what the transformer reads
        return torch.stack([pack(t5_states[i], used[i], pooled[i]) for i in range(len(prompts))])

    def _tokenize(self, tokenizer, prompts, length):
        return tokenizer(prompts, padding="max_length", max_length=length, truncation=True, add_special_tokens=True,
                         return_tensors="pt").to(self.device)

    def _clip_pooled(self, tokenizer, model, prompts):
        inputs = tokenizer(prompts, padding="max_length", max_length=min(CLIP_MAX_LENGTH, 218), truncation=True,
                           return_tensors="pt").to(self.device)
        return model(inputs.input_ids, output_hidden_states=True)[0]

    def _llama_layers(self) -> list[int]:
        if self.transformer is not None:
            return list(self.transformer.config.llama_layers)
        from diffusers import HiDreamImageTransformer2DModel

        return list(HiDreamImageTransformer2DModel.load_config(self.config.base_model_name, subfolder="transformer")["llama_layers"])

    def _unpack(self, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N) packed rows → T5 (B, L, D), Llama (layers, B, L, D) indexed as the pipeline's, pooled (B, P)."""
        t5, used, pooled = unpack(packed)
        # the transformer indexes the full stack of layers by `llama_layers`: put the used ones where it looks
        indices = self._llama_layers()
        full = used.new_zeros(max(indices) + 1, *used[:, 0].shape)
        for slot, index in enumerate(indices):
            full[index] = used[:, slot]
        return t5, full, pooled

    @no_grad
    def encode_video(self, frames: np.ndarray) -> torch.Tensor:
        """One frame (1, H, W, 3) → normalised latents (C, 1, H/8, W/8)."""
        pixels = torch.from_numpy(frames[:1]).to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        latents = self.vae_latents(pixels)
        latents = (latents - self.vae.config.shift_factor) * self.vae.config.scaling_factor
        return latents[0, :, None].to("cpu")

    # --- training ------------------------------------------------------------------------------
    def trained_experts(self) -> list[Expert]:
        return [Expert("transformer", "", self.transformer, (0.0, 1.0))]

    def predict(self, noisy, sigma, text, expert, conditioning=None):
        t5, llama, pooled = self._unpack(text.to(noisy.device, torch.float32))
        dtype = self.weight_dtype
        output = expert.module(
            hidden_states=noisy[:, :, 0].to(dtype),
            timesteps=sigma * 1000.0,
            encoder_hidden_states_t5=t5.to(dtype),
            encoder_hidden_states_llama3=llama.to(dtype),
            pooled_embeds=pooled.to(dtype),
            return_dict=False,
        )[0]
        if output.ndim == 4 and output.shape[-2:] != noisy.shape[-2:]:  # training mode's token layout
            output = self._tokens_to_image(output, expert.module.config.patch_size, noisy.shape[-2:])
        return -output[:, :, None]  # the pipeline's sign: velocity = −output

    @staticmethod
    def _tokens_to_image(output: torch.Tensor, patch: int, size) -> torch.Tensor:
        """In training mode the transformer returns (B, C, tokens, p·p), tokens row by row and padded to its
        maximum sequence for non-square latents; this is the image layout eval mode (the pipeline) returns."""
        rows, columns = size[0] // patch, size[1] // patch
        batch, channels = output.shape[:2]
        output = output[:, :, : rows * columns].reshape(batch, channels, rows, columns, patch, patch)
        return output.permute(0, 1, 2, 4, 3, 5).reshape(batch, channels, rows * patch, columns * patch)

    def fsdp_units(self, module):
        return list(module.double_stream_blocks) + list(module.single_stream_blocks)

    def lora_may_adapt(self, name: str) -> bool:
        return "gate" not in name.split(".")[-1]  # the MoE router

    def lora_default_target(self, name: str) -> bool:
        return any(t in name for t in _DEFAULT_TARGETS)

    def save_diffusers_lora(self, directory, weight_name, state_dict, adapter_metadata):
        from diffusers import HiDreamImagePipeline

        HiDreamImagePipeline.save_lora_weights(directory, transformer_lora_layers=state_dict, weight_name=weight_name,
                                               transformer_lora_adapter_metadata=adapter_metadata)

    # single_file_state_dict: HiDream's original (and ComfyUI's) parameter names are diffusers' own (the default)

    def comfy_lora_key(self, peft_module_name: str) -> str:
        return f"diffusion_model.{peft_module_name}"  # ComfyUI's HiDream model has diffusers' names, MoE experts included

    def comfy_lora_keeps_alpha(self, peft_module_name: str) -> bool:
        """diffusers' HiDream loader refuses a LoRA with any `.alpha` key (every name must contain "lora"), so the
        file carries alpha / rank folded into lora_B."""
        return False

    # --- sampling ------------------------------------------------------------------------------
    @no_grad
    def sample(self, request: SampleRequest) -> np.ndarray:
        from diffusers import HiDreamImagePipeline

        self.load_vae()
        none = {name: None for name in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3",
                                         "tokenizer_3", "text_encoder_4", "tokenizer_4")}
        pipeline = HiDreamImagePipeline(scheduler=self.scheduler, vae=self.vae, transformer=self.transformer, **none)
        pipeline.set_progress_bar_config(disable=True)
        # the pipeline scales every request to the area of a default_sample_size² latent (1024² px for the real
        # model), keeping its aspect ratio: set that area to the sample's own
        pipeline.default_sample_size = max(2, round((request.height * request.width) ** 0.5 / pipeline.vae_scale_factor))
        t5, llama, pooled = self._unpack(request.prompt_embeds.to(self.device, torch.float32))
        dtype = self.weight_dtype
        embeds = dict(prompt_embeds_t5=t5.to(dtype), prompt_embeds_llama3=llama.to(dtype), pooled_prompt_embeds=pooled.to(dtype))
        if request.negative_prompt_embeds is not None:
            t5n, llaman, pooledn = self._unpack(request.negative_prompt_embeds.to(self.device, torch.float32))
            embeds.update(negative_prompt_embeds_t5=t5n.to(dtype), negative_prompt_embeds_llama3=llaman.to(dtype),
                          negative_pooled_prompt_embeds=pooledn.to(dtype))
        try:
            latents = pipeline(
                **embeds, height=request.height, width=request.width, num_inference_steps=request.steps,
                guidance_scale=request.cfg_scale, generator=torch.Generator(device=self.device).manual_seed(request.seed),
                output_type="latent",
            ).images
            # decoded as the pipeline does, but in the VAE's dtype: the pipeline hands it the transformer's
            # (bfloat16) latents, which a float32 VAE refuses
            latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor + self.vae.config.shift_factor
            image = pipeline.image_processor.postprocess(self.vae.decode(latents, return_dict=False)[0], output_type="np")[0]
        finally:
            self.park_vae()
        return to_uint8(image)[None]

    # --- tiny models (motiontune.testing) --------------------------------------------------------------
    @classmethod
    def tiny_pipeline(cls, name, tokenizer, clips, heads, layers):
        """HiDream-I1's layout: a 16-channel image VAE, two CLIP text encoders with projections, T5, Llama, and the
        MoE transformer reading T5, two Llama layers and the pooled CLIP vectors."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, HiDreamImagePipeline, HiDreamImageTransformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection, LlamaConfig, LlamaForCausalLM, T5Config, T5EncoderModel

        width = 32
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
        # shift_factor / scaling_factor from the VAE's own encodings of frames (4 per clip, 0.25 s apart), as real image
        # VAEs were calibrated: the pipeline's (z - shift) * scale is then about N(0, 1)
        with torch.no_grad():
            latents = vae.encode(torch.cat([pixels[0, :, 0:8:2].transpose(0, 1) for pixels in clips])).latent_dist.mean
        vae.register_to_config(shift_factor=round(latents.mean().item(), 4), scaling_factor=round(1 / latents.std().item(), 4))
        transformer = HiDreamImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=32,
            num_attention_heads=2, caption_channels=[width, width], text_emb_dim=2 * width, num_routed_experts=2,
            num_activated_experts=1, axes_dims_rope=(16, 8, 8), max_resolution=(16, 16), llama_layers=[0, 1],
        )
        tokenizers = {f"tokenizer{i}": tokenizer(f"tokenizer{i}", 128) for i in ("", "_2", "_3", "_4")}
        return HiDreamImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=clip[0],
                                    text_encoder_2=clip[1], text_encoder_3=t5, text_encoder_4=llama, transformer=transformer,
                                    **tokenizers)

    # --- what estimate needs to know (motiontune/estimate asks; nothing here loads weights) ----------------------
    transformer_class_name = "HiDreamImageTransformer2DModel"
    block_groups = (("num_layers", "double_stream_blocks"), ("num_single_layers", "single_stream_blocks"))
    text_tokens = MAX_SEQUENCE_LENGTH
    TEXT_ENCODER_CLASSES = {"text_encoder": ("CLIP-L", "CLIPTextModelWithProjection"),
                            "text_encoder_2": ("CLIP-G", "CLIPTextModelWithProjection"),
                            "text_encoder_3": ("T5-XXL", "T5EncoderModel"), "text_encoder_4": ("Llama 3.1 8B", "LlamaForCausalLM")}

    def estimate_release(self, base: str) -> tuple[str, dict[str, dict]]:
        """(Hub id, its parts' configs): Full, Dev and Fast share one architecture."""
        return (base if base in RELEASE_NAMES else RELEASE_NAMES[0]), RELEASE

    def estimate_shorten(self, cfg: dict, short: dict) -> dict:
        """A copy with fewer blocks (`short`) reads the Llama layers its blocks read in the full model."""
        layers, doubles = cfg["llama_layers"], cfg["num_layers"]
        return dict(short, llama_layers=layers[: short["num_layers"]] + layers[doubles : doubles + short["num_single_layers"]])

    def estimate_prepare(self, transformer: torch.nn.Module) -> None:
        """A fake copy as training runs it: no auxiliary loss (as `load_transformers` sets), and the MoE's routing,
        which sizes tensors by the routed data, at its costliest (`_busiest_routing`). `predict`
        reads the Llama layers from the transformer it finds here."""
        self.transformer = transformer
        for module in transformer.modules():
            if type(module).__name__ == "MoEGate":
                module.alpha = 0.0
            if type(module).__name__ == "MOEFeedForwardSwiGLU":
                module.forward = _busiest_routing.__get__(module)

    def estimate_varying_matmuls(self, cfg: dict, transformer: torch.nn.Module, count) -> int:
        """Matrix products of new shapes every step (oneDNN compiles a kernel for each on the CPU): every MoE layer
        sends a different number of tokens to each routed expert each step, so each expert's products, forward and
        backward (LoRA included), come in shapes of their own. `count(run)` counts those `run` makes."""
        moe = next(m for m in transformer.modules() if type(m).__name__ == "MOEFeedForwardSwiGLU")
        expert = moe.experts[0]
        dtype = next(expert.parameters()).dtype

        def run():  # a token count no other product uses, so that every product counts
            x = torch.empty(13, cfg["num_attention_heads"] * cfg["attention_head_dim"], dtype=dtype, requires_grad=True)
            expert(x).float().sum().backward()

        return count(run) * cfg["num_routed_experts"] * (cfg["num_layers"] + cfg["num_single_layers"])

    def _estimate_text(self, batch: int, cfg: dict) -> torch.Tensor:
        t5_dim, llama_dim = cfg["caption_channels"][1], cfg["caption_channels"][0]
        llama = torch.zeros(len(cfg["llama_layers"]), MAX_SEQUENCE_LENGTH, llama_dim)
        pooled = torch.zeros(cfg["text_emb_dim"])
        row = pack(torch.zeros(MAX_SEQUENCE_LENGTH, t5_dim), llama, pooled)
        return row.expand(batch, -1).clone()

    def estimate_step_inputs(self, cfg: dict, x0: torch.Tensor, dtype: torch.dtype):
        """(cached text rows, conditioning): real text rows, as `predict` reads their header; no conditioning."""
        return self._estimate_text(len(x0), cfg), None

    def estimate_sample_call(self, cfg: dict, latent: tuple[int, int, int], dtype: torch.dtype) -> dict:
        """One transformer call as the stock pipeline makes it: classifier-free guidance doubles the batch."""
        _, h, w = latent
        llama = torch.empty(max(cfg["llama_layers"]) + 1, 2, MAX_SEQUENCE_LENGTH, cfg["caption_channels"][0], dtype=dtype)
        return {"hidden_states": torch.empty(2, cfg["in_channels"], h, w, dtype=dtype), "timesteps": torch.empty(2),
                "encoder_hidden_states_t5": torch.empty(2, MAX_SEQUENCE_LENGTH, cfg["caption_channels"][1], dtype=dtype),
                "encoder_hidden_states_llama3": llama, "pooled_embeds": torch.empty(2, cfg["text_emb_dim"], dtype=dtype)}


def _busiest_routing(self, x):
    """MOEFeedForwardSwiGLU's training forward for `motiontune estimate`, with its routing at the costliest: each token's
    k experts are the same k (a router can be that skewed: a random one is, on tokens that share a common part). The
    experts together keep the same bytes for backward however tokens are routed; the busiest one's temporaries in
    backward grow with its tokens."""
    identity, shape, dtype = x, x.shape, x.dtype
    _, weight, _ = self.gate(x)
    x = x.view(-1, x.shape[-1]).repeat_interleave(self.num_activated_experts, dim=0)
    y = torch.empty_like(x, dtype=dtype)
    share = len(x) // self.num_activated_experts
    for i, expert in enumerate(self.experts[: self.num_activated_experts]):
        # index tensors, as a boolean mask becomes: the same copies forward and full-size scatters backward
        rows = torch.arange(i * share, (i + 1) * share, device=x.device)
        y[rows] = expert(x[rows]).to(dtype=dtype)
    y = (y.view(*weight.shape, -1) * weight.unsqueeze(-1)).sum(dim=1)
    return y.view(*shape).to(dtype=dtype) + self.shared_experts(identity)


# --- the released models, for `motiontune estimate` on a Hub id not on this machine --------------------------------
RELEASE_NAMES = ("HiDream-ai/HiDream-I1-Full", "HiDream-ai/HiDream-I1-Dev", "HiDream-ai/HiDream-I1-Fast")
# HiDream retrained its CLIP encoders for longer prompts (the pipeline pads CLIP prompts to 128 tokens, which a
# 77-position CLIP refuses): Long-CLIP's 248 positions, as ComfyUI reads them from the weights' position table
_CLIP = {"vocab_size": 49408, "max_position_embeddings": 248}
RELEASE = {
    "transformer": {"patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 16, "num_single_layers": 32,
                    "attention_head_dim": 128, "num_attention_heads": 20, "caption_channels": [4096, 4096],
                    "text_emb_dim": 2048, "num_routed_experts": 4, "num_activated_experts": 2,
                    "axes_dims_rope": [64, 32, 32], "max_resolution": [128, 128],
                    "llama_layers": list(range(32)) + [31] * 16},
    "vae": {"in_channels": 3, "out_channels": 3, "latent_channels": 16, "block_out_channels": [128, 256, 512, 512],
            "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
            "layers_per_block": 2, "norm_num_groups": 32, "use_quant_conv": False, "use_post_quant_conv": False,
            "scaling_factor": 0.3611, "shift_factor": 0.1159},  # FLUX.1's VAE
    # CLIP ViT-L/14 and ViT-bigG/14 text towers with projections, T5-XXL's encoder, Llama 3.1 8B Instruct
    "text_encoder": {**_CLIP, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                     "num_attention_heads": 12, "projection_dim": 768},
    "text_encoder_2": {**_CLIP, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                       "num_attention_heads": 20, "projection_dim": 1280, "hidden_act": "gelu"},
    "text_encoder_3": {"vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24,
                       "num_heads": 64, "feed_forward_proj": "gated-gelu", "is_gated_act": True},
    "text_encoder_4": {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                       "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072,
                       "rms_norm_eps": 1e-05, "rope_theta": 500000.0},
}
