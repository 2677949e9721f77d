"""WAN 2.1 / 2.2 (T2V 1.3B/14B, T2V and I2V A14B with two experts, TI2V-5B): the whole family in one file.

Image-to-video, as the stock `WanImageToVideoPipeline` does it:
- I2V A14B: 36 input channels = the noisy latents (16) + a first-frame mask (4) + the VAE latents of the
  first frame followed by black frames (16). The last two are built when the clip is encoded and cached
  with its latents as one (36, F', H', W') tensor.
- WAN 2.1 I2V: the same 36 channels, plus the CLIP image encoder's embedding of the first frame (its
  second-to-last hidden states), cached beside the clip's latents and given to cross-attention.
- WAN 2.1 FLF2V (first-last-frame-to-video): WAN 2.1 I2V's channels, with the clip's last frame in place of the last
  black frame (and marked by the mask), and CLIP embeddings of both frames, which the transformer reads as one
  sequence with a learnt position embedding (`pos_embed_seq_len`).
- TI2V-5B: the clean latents of the first frame replace the noisy first latent frame, whose tokens get
  timestep 0 and are left out of the loss (`image_conditioning_probability` of the samples).

WAN 2.2 Animate, as `WanAnimatePipeline` does it in "animate" mode for one segment:
- the latents to denoise are one latent frame longer than the clip: the reference (character) picture's slot first,
  which the pipeline throws away at the end (here: its latents as x0, left out of the loss);
- 36 input channels: those 16, then 4 mask channels and 16 of latents: the reference picture (mask 1) in its slot,
  the VAE latents of an empty (zero) video (mask 0) over the clip's frames;
- the pose video's VAE latents, added after the patch embedding; the face video as pixels (motion_encoder_size
  square), through the transformer's own motion and face encoders; CLIP's embedding of the reference picture.
The reference is `<clip>-reference.png` beside the clip, or the clip's own first frame when there is none.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from ..util.lazy import no_grad, np, torch
from .attention import use_frame_local_attention
from .base import Conditioning, Expert, ModelFamily, SampleRequest, to_uint8
from .loading import load_part, read_model_index

MODEL_TYPES = ("WAN_2_1_T2V", "WAN_2_2_T2V_A14B", "WAN_2_2_TI2V_5B", "WAN_2_1_I2V", "WAN_2_2_I2V_A14B", "WAN_2_1_VACE",
               "WAN_2_1_FLF2V", "WAN_2_2_ANIMATE")
# The two-expert WAN 2.2 models
A14B_MODEL_TYPES = ("WAN_2_2_T2V_A14B", "WAN_2_2_I2V_A14B")
# The stock pipeline pads every prompt to this many tokens; training must see the same padding.
MAX_SEQUENCE_LENGTH = 512

# WAN 2.2 A14B: the high-noise expert (`transformer`) serves t >= boundary × 1000, the low-noise
# expert (`transformer_2`) the rest (the pipeline's `boundary_ratio`; 0.875 for T2V, 0.9 for I2V).
DEFAULT_BOUNDARY = {"WAN_2_2_T2V_A14B": 0.875, "WAN_2_2_I2V_A14B": 0.9}

# diffusers module names → the original Wan names ComfyUI uses (its WanModel state dict).
_COMFY_RENAMES = [
    (r"\.attn1\.to_q$", ".self_attn.q"), (r"\.attn1\.to_k$", ".self_attn.k"),
    (r"\.attn1\.to_v$", ".self_attn.v"), (r"\.attn1\.to_out\.0$", ".self_attn.o"),
    (r"\.attn2\.to_q$", ".cross_attn.q"), (r"\.attn2\.to_k$", ".cross_attn.k"),
    (r"\.attn2\.to_v$", ".cross_attn.v"), (r"\.attn2\.to_out\.0$", ".cross_attn.o"),
    (r"\.attn2\.add_k_proj$", ".cross_attn.k_img"), (r"\.attn2\.add_v_proj$", ".cross_attn.v_img"),
    (r"\.ffn\.net\.0\.proj$", ".ffn.0"), (r"\.ffn\.net\.2$", ".ffn.2"),
    (r"^condition_embedder\.(text|time)_embedder\.linear_1$", r"\1_embedding.0"),
    (r"^condition_embedder\.(text|time)_embedder\.linear_2$", r"\1_embedding.2"),
    (r"^condition_embedder\.time_proj$", "time_projection.1"),
    (r"^condition_embedder\.image_embedder\.ff\.net\.0\.proj$", "img_emb.proj.1"),  # WAN 2.1 I2V's CLIP projection
    (r"^condition_embedder\.image_embedder\.ff\.net\.2$", "img_emb.proj.3"),
    (r"^proj_out$", "head.head"),
    (r"^(vace_blocks\.\d+)\.proj_in$", r"\1.before_proj"), (r"^(vace_blocks\.\d+)\.proj_out$", r"\1.after_proj"),  # VACE
]

# The rest of the original names, for whole checkpoints (norms and modulation tables).
_ORIGINAL_RENAMES = _COMFY_RENAMES + [
    (r"\.attn1\.norm_q$", ".self_attn.norm_q"), (r"\.attn1\.norm_k$", ".self_attn.norm_k"),
    (r"\.attn2\.norm_q$", ".cross_attn.norm_q"), (r"\.attn2\.norm_k$", ".cross_attn.norm_k"),
    (r"\.attn2\.norm_added_k$", ".cross_attn.norm_k_img"),
    (r"^condition_embedder\.image_embedder\.norm1$", "img_emb.proj.0"),
    (r"^condition_embedder\.image_embedder\.norm2$", "img_emb.proj.4"),
    (r"^((?:vace_)?blocks\.\d+)\.norm2$", r"\1.norm3"),  # VACE's blocks are named as the main ones
    (r"^((?:vace_)?blocks\.\d+)\.scale_shift_table$", r"\1.modulation"),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^condition_embedder\.image_embedder\.pos_embed$", "img_emb.emb_pos"),  # FLF2V: the two images' positions
]


# Animate's modules beyond WAN's, which the original layout names otherwise (the face adapter fuses key and value)
_ANIMATE_OWN_LINEARS = ("face_adapter.0.to_q", "face_adapter.0.to_k", "face_adapter.0.to_v", "face_adapter.0.to_out",
                        "face_encoder.out_proj")


def _animate_problems(config) -> list[str]:
    problems = []
    if config.masked_training:
        problems.append("  - masked_training: not built for WAN_2_2_ANIMATE (its latents carry the reference's slot); "
                        "remove it")
    if config.output_model_format == "COMFY_TRANSFORMER":
        problems.append("  - output_model_format = COMFY_TRANSFORMER: the original names of WAN 2.2 Animate's face and "
                        "motion encoders are not written yet; use DIFFUSERS")
    filters = [f.strip() for f in config.layer_filter.split(",") if f.strip()]
    touched = [name for name in _ANIMATE_OWN_LINEARS if any(f in name for f in filters)]
    if config.output_model_format == "COMFY_LORA" and touched:
        problems.append(f"  - layer_filter = {config.layer_filter!r} adapts {', '.join(touched)}: COMFY_LORA does not "
                        "name Animate's face adapter and encoder yet; set output_model_format to DIFFUSERS_LORA, or keep "
                        "the filter to the blocks (`blocks.`)")
    return problems


def _renamed(module: str, renames: list) -> str:
    for pattern, replacement in renames:
        module, count = re.subn(pattern, replacement, module)
        if count:
            break
    return module


def original_name(diffusers_name: str) -> str:
    """A diffusers WanTransformer3DModel parameter name in the original WAN (and ComfyUI) layout."""
    module, _, leaf = diffusers_name.rpartition(".")
    if leaf in ("scale_shift_table", "pos_embed"):  # a parameter that is not inside a sub-module
        module, leaf = diffusers_name, ""
    module = _renamed(module, _ORIGINAL_RENAMES)
    return f"{module}.{leaf}" if leaf else module


# Default LoRA targets: every attention projection and feed-forward layer of every block.
_DEFAULT_TARGETS = re.compile(r"^blocks\.\d+\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0|add_k_proj|add_v_proj)$|^blocks\.\d+\.ffn\.net\.(0\.proj|2)$")


class WanFamily(ModelFamily):
    MODEL_TYPES = MODEL_TYPES
    NAME = "WAN"
    # diffusers' WanTransformer3DModel (FLF2V's too) has a context-parallel plan; the VACE and Animate transformers have none
    CONTEXT_PARALLEL = True
    CONTEXT_PARALLEL_EXCEPT = ("WAN_2_1_VACE", "WAN_2_2_ANIMATE")
    QUANTIZED_TEXT_ENCODER = True  # UMT5-XXL is ~11 GB in bf16: FLOAT_8 lets an 8 GB GPU encode captions
    TINY_MODELS = ("wan-2.1", "wan-2.2-a14b", "wan-2.2-ti2v-5b", "wan-2.1-i2v", "wan-2.2-i2v-a14b", "wan-2.1-vace",
                   "wan-2.1-flf2v", "wan-2.2-animate")
    LORA_PIPELINE = "WanPipeline"
    VAE_CLASS = "AutoencoderKLWan"
    temporal_factor = 4
    transformer_2 = None

    @classmethod
    def vae_compression(cls, model_type):
        # TI2V-5B's VAE compresses 16x (8x plus a 2x patchify)
        return (16, 4) if model_type == "WAN_2_2_TI2V_5B" else cls.VAE_COMPRESSION

    @classmethod
    def first_frame(cls, model_type):
        if "_I2V" in model_type or model_type == "WAN_2_1_FLF2V":
            return "required"
        return "optional" if model_type == "WAN_2_2_TI2V_5B" else None

    @classmethod
    def condition_roles(cls, config):
        # VACE: every clip follows its control video (pose, depth, edges...: data/conditions.py); a mask says which part
        # of it is made anew (inpainting, outpainting), a reference picture what to keep (a character, an object).
        # Animate: its pose and face videos, and a reference picture where one is given (else the clip's first frame)
        if config.model_type == "WAN_2_2_ANIMATE":  # replace mode where a clip has a background and its mask
            return {"pose": True, "face": True, "reference": False, "background": False, "charactermask": False}
        if config.model_type == "WAN_2_1_VACE":
            return {"control": True, "controlmask": False, "reference": False}
        return {}

    @classmethod
    def stand_in_roles(cls, config):
        # VACE: a clip with a reference picture and no control video ("keep this character") trains as WanVACEPipeline
        # runs without `video`: on a grey video's latents, every frame made anew (`encode_stand_in`)
        return {"control": ("reference",)} if config.model_type == "WAN_2_1_VACE" else {}

    @classmethod
    def layout_roles(cls, config):
        # VACE: a reference picture puts one latent frame before the clip's; Animate's clips all have a reference slot
        return ("reference",) if config.model_type == "WAN_2_1_VACE" else ()

    @classmethod
    def sample_roles(cls, config):
        # WanAnimatePipeline animates a character picture: a sample gives one (training takes the clip's first frame)
        roles = cls.condition_roles(config)
        return {**roles, "reference": True} if config.model_type == "WAN_2_2_ANIMATE" else roles

    @classmethod
    def whole_roles(cls, config):
        # VACE places a reference picture whole in the frame (as WanVACEPipeline's reference_images); Animate's
        # reference is the clip's character, read through the clip's crop like one of its frames
        return ("reference",) if config.model_type == "WAN_2_1_VACE" else ()

    @classmethod
    def condition_companions(cls, role):
        # VACE encodes a control video's frames apart by its mask: the two make one condition; Animate's replace mode
        # a background video with the mask of the character made over it
        return {"control": ("controlmask",), "background": ("charactermask",)}.get(role, ())

    @classmethod
    def paired_roles(cls, config):
        # WanAnimatePipeline's replace mode takes a background video and a mask video, both or neither
        return (("background", "charactermask"),) if config.model_type == "WAN_2_2_ANIMATE" else ()

    @classmethod
    def expert_parts(cls, model_type: str) -> tuple[str, ...]:
        return ("transformer", "transformer_2") if model_type in A14B_MODEL_TYPES else ("transformer",)

    @classmethod
    def takes_last_frame(cls, model_type):
        # WAN 2.1 I2V's CLIP embedding takes one image; FLF2V's takes two
        return model_type in ("WAN_2_2_I2V_A14B", "WAN_2_1_FLF2V")

    @classmethod
    def config_problems(cls, config):
        if config.model_type == "WAN_2_1_FLF2V":
            return super().config_problems(config) + cls._flf2v_problems(config)
        if config.model_type == "WAN_2_2_ANIMATE":
            return super().config_problems(config) + _animate_problems(config)
        if config.model_type not in A14B_MODEL_TYPES:
            return super().config_problems(config)
        if config.expert_choice() is None:
            return ["  - experts: WAN 2.2 A14B needs an expert to train; set experts to both, high or low "
                    "(or transformer.train / transformer_2.train: high-noise / low-noise expert)"]
        return cls._split_problems(config) if config.experts_on == "split" else []

    @staticmethod
    def _split_problems(config) -> list[str]:
        """`experts_on: split`: each expert lives on its own processes, so only what trains the experts alone can run."""
        problems = []
        if config.expert_choice() != "both":
            problems.append(f"  - experts_on = split: places the two experts on two groups of processes; with experts = "
                            f"{config.expert_choice()} only one trains. Set experts to both, or experts_on to together")
        if config.training_method not in ("LORA", "FINE_TUNE"):
            problems.append(f"  - experts_on = split with training_method {config.training_method}: only LORA and FINE_TUNE "
                            "train the experts themselves; set experts_on to together")
        if config.text_encoder.train or config.additional_embeddings:
            problems.append("  - experts_on = split with text_encoder.train / additional_embeddings: a text side shared by "
                            "both expert groups is not built; train it with experts_on together")
        if config.validation:
            problems.append("  - experts_on = split with validation: a validation loss needs both experts in one process; "
                            "set validation to false, or experts_on to together")
        return problems

    @staticmethod
    def _flf2v_problems(config) -> list[str]:
        """FLF2V always sees two frames: its transformer reads the two CLIP embeddings as one sequence of twice the
        tokens (diffusers' pipeline fails without `last_image`), so there is no first-frame-only sample to train."""
        problems = []
        if config.last_frame_conditioning_probability != 1:
            problems.append(f"  - last_frame_conditioning_probability = {config.last_frame_conditioning_probability:g}: "
                            "WAN_2_1_FLF2V always takes a first and a last frame (its pipeline has no first-frame-only "
                            "mode); set it to 1")
        for index, sample in enumerate(config.samples):
            if sample.image and not sample.last_image:
                problems.append(f"  - samples[{index}].last_image: WAN_2_1_FLF2V makes videos between a first and a last "
                                "frame; give an image file")
        return problems

    def __init__(self, config, device):
        super().__init__(config, device)
        self.is_a14b = config.model_type in A14B_MODEL_TYPES
        self.is_ti2v = config.model_type == "WAN_2_2_TI2V_5B"
        self.is_i2v = self.first_frame(config.model_type) == "required"  # condition channels
        self.is_flf2v = config.model_type == "WAN_2_1_FLF2V"
        self.is_vace = config.model_type == "WAN_2_1_VACE"  # control videos through the VACE blocks
        self.is_animate = config.model_type == "WAN_2_2_ANIMATE"  # pose and face videos and a reference picture
        # a CLIP embedding of the first frame (FLF2V: and of the last, `clip_extras`; Animate: the reference picture's,
        # the first frame standing in for it)
        self.encodes_first_frame = config.model_type in ("WAN_2_1_I2V", "WAN_2_1_FLF2V", "WAN_2_2_ANIMATE")
        # the VAE's spatial factor, times the transformer's 2x2 patches
        self.spatial_multiple = self.vae_compression(config.model_type)[0] * 2
        self.expert_names = {"both": ["transformer", "transformer_2"], "high": ["transformer"], "low": ["transformer_2"]}[
            config.expert_choice() if self.is_a14b else "high"
        ]

    # --- loading -------------------------------------------------------------------------------
    # The encoders load only when something is not in the cache, and leave before training.
    ENCODER_PARTS = {"vae": ("vae", "image_encoder", "image_processor"), "text": ("tokenizer", "text_encoder")}
    IMAGE_ENCODER = ("CLIPVisionModel", "CLIPImageProcessor", "image_processor")  # WAN 2.1 I2V's

    def load_transformers(self) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler, WanTransformer3DModel

        base = self.config.base_model_name
        # sampling only (training draws its own noise levels): Animate's pipeline ships UniPC in its flow form
        self.scheduler = load_part(UniPCMultistepScheduler if self.is_animate else FlowMatchEulerDiscreteScheduler,
                                   base, "scheduler")
        pipeline_config = read_model_index(base)
        self.boundary_ratio = (
            self.config.boundary_ratio or pipeline_config.get("boundary_ratio") or DEFAULT_BOUNDARY.get(self.config.model_type)
        )
        self.expand_timesteps = bool(pipeline_config.get("expand_timesteps", self.is_ti2v))
        if self.is_vace:
            from diffusers import WanVACETransformer3DModel as WanTransformer3DModel  # noqa: N814
        elif self.is_animate:
            from diffusers import WanAnimateTransformer3DModel as WanTransformer3DModel  # noqa: N814
        # `experts_on: split`: a process loads only the expert it trains (`held_expert`); the other stays None
        held = self.held_expert
        self.transformer = (self.load_transformer(WanTransformer3DModel, "transformer", self.config.transformer)
                            if held in (None, "transformer") else None)
        if self.is_flf2v and not self.transformer.config.pos_embed_seq_len:
            raise ValueError(f"base_model_name = {base!r}: its transformer takes one image (no pos_embed_seq_len), so it is "
                             "not WAN 2.1 FLF2V; use Wan-AI/Wan2.1-FLF2V-14B-720P-diffusers, or model_type WAN_2_1_I2V")
        if self.is_a14b:
            self.transformer_2 = (self.load_transformer(WanTransformer3DModel, "transformer_2", self.config.transformer_2)
                                  if held in (None, "transformer_2") else None)

    def load_text_encoder(self) -> None:
        from transformers import AutoTokenizer, UMT5EncoderModel

        tokenizer = load_part(AutoTokenizer, self.config.base_model_name, "tokenizer")
        text_encoder = self.load_text_model(UMT5EncoderModel, "text_encoder", quantize="encoder")
        self.encoders = {"umt5xxl": (tokenizer, text_encoder)}  # ComfyUI's key for WAN's UMT5-XXL

    @property
    def text_encoder(self):
        """The UMT5 encoder, once loaded."""
        return self.encoders["umt5xxl"][1] if self.encoders else None

    # --- encoding ------------------------------------------------------------------------------
    def _encode(self, prompts: list[str]) -> torch.Tensor:
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        tokenizer, text_encoder = self.encoders["umt5xxl"]
        inputs = tokenizer([prompt_clean(p) for p in prompts], padding="max_length", max_length=MAX_SEQUENCE_LENGTH,
                           truncation=True, add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        mask = inputs.attention_mask.to(self.device)
        hidden = text_encoder(inputs.input_ids.to(self.device), mask).last_hidden_state
        # As the stock pipeline: positions past each prompt's length are zeros, not encoder output.
        return hidden * mask.unsqueeze(-1).to(hidden.dtype)

    @no_grad
    def encode_video(self, frames: np.ndarray) -> torch.Tensor:
        pixels = self.video_pixels(frames)
        latents = self.vae_latents(pixels)
        mean, std = self._latent_stats(latents)
        latents = (latents - mean) / std
        if self.is_i2v:
            latents = torch.cat([latents, self._image_condition(pixels, mean, std)], dim=1)
        elif self.is_animate:  # the clip's frames in the condition: an empty (zero) video, mask 0 (a first segment)
            empty = (self.vae_latents(torch.zeros_like(pixels), mode=True) - mean) / std
            latents = torch.cat([latents, empty.new_zeros(1, 4, *empty.shape[2:]), empty], dim=1)
        return latents[0].to("cpu")

    def _image_condition(self, pixels, mean, std, last: bool = False):
        """The mask and first-frame latents `WanImageToVideoPipeline.prepare_latents` builds: the first frame
        followed by black (zero) frames through the VAE, and a mask of 1 on the first frame's 4 slots. `last`: the
        clip's last frame in place of the last black one, and the mask 1 on it too (the pipeline's `last_image`)."""
        frames = pixels.shape[2]
        video = pixels.clone()
        video[:, :, 1 : frames - 1 if last else frames] = 0
        condition = (self.vae_latents(video, mode=True) - mean) / std
        _, _, latent_frames, height, width = condition.shape
        mask = torch.zeros(1, 1, frames, height, width, device=pixels.device)
        mask[:, :, 0] = 1
        if last:
            mask[:, :, -1] = 1
        mask = torch.cat([mask[:, :, :1].repeat_interleave(self.temporal_factor, dim=2), mask[:, :, 1:]], dim=2)
        mask = mask.view(1, latent_frames, self.temporal_factor, height, width).transpose(1, 2)
        return torch.cat([mask.to(condition.dtype), condition], dim=1)

    @no_grad
    def encode_first_frame(self, frame: np.ndarray) -> torch.Tensor:
        """As `WanImageToVideoPipeline.encode_image`: CLIP's second-to-last hidden states of the frame."""
        inputs = self.image_processor(images=frame, return_tensors="pt").to(self.device)
        return self.image_encoder(**inputs, output_hidden_states=True).hidden_states[-2][0].to("cpu")

    @no_grad
    def encode_condition(self, role, frames, companions=None):
        """Animate's pose, face and reference (`_animate_condition`); else VACE's (`_vace_condition`)."""
        if self.is_animate:
            return self._animate_condition(role, frames, companions)
        return self._vace_condition(role, frames, companions)

    def _animate_condition(self, role, frames, companions=None):
        """As `WanAnimatePipeline` prepares them: pose → its VAE latents (the posterior's mode), normalised (16, F', H',
        W'); face → its frames resized to the motion encoder's square as the pipeline's video processor does, kept as
        uint8 (3, F, S, S) (a step makes them [-1, 1]; uint8 is a quarter of the size and loses nothing); reference →
        its first frame's condition (mask and latents, `_reference`) packed with its CLIP embedding; background (with
        its `charactermask`) → the clip's condition in replace mode (`_replace_condition`)."""
        if role == "background":
            return self._replace_condition(frames, (companions or {})["charactermask"])
        pixels = self.video_pixels(frames)
        if role == "pose":
            mean, std = self._latent_stats(pixels)
            return ((self.vae_latents(pixels, mode=True) - mean) / std)[0].to("cpu")
        if role == "face":
            from diffusers.video_processor import VideoProcessor
            from PIL import Image

            size = self._motion_encoder_size()
            video = VideoProcessor(vae_scale_factor=self.vae_compression(self.config.model_type)[0]).preprocess_video(
                [Image.fromarray(frame) for frame in frames], height=size, width=size)
            return ((video[0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        from .packing import pack

        return pack(self._reference(pixels[:, :, :1]), self.encode_first_frame(frames[0])).to("cpu")

    def _replace_condition(self, background, mask_frames):
        """`WanAnimatePipeline.prepare_prev_segment_cond_latents` in replace mode for a first segment: the background
        video's VAE latents (mode), normalised, after 4 mask channels: the character mask read as the pipeline's mask
        processor reads it (grey, [0, 1]), inverted (1 where the background is kept), nearest to the latent grid, its
        first frame four times (`get_i2v_mask`): (20, F', H', W'), in place of animate mode's empty video and zero mask."""
        from diffusers.video_processor import VideoProcessor
        from PIL import Image

        pixels = self.video_pixels(background)
        mean, std = self._latent_stats(pixels)
        latents = (self.vae_latents(pixels, mode=True) - mean) / std
        if len(mask_frames) == 1:  # a picture: the same mask on every frame
            mask_frames = np.repeat(mask_frames, len(background), axis=0)
        spatial = self.vae_compression(self.config.model_type)[0]
        processor = VideoProcessor(vae_scale_factor=spatial, do_normalize=False, do_convert_grayscale=True)
        mask = processor.preprocess_video([Image.fromarray(frame) for frame in mask_frames], height=background.shape[1],
                                          width=background.shape[2]).to(self.device, torch.float32)
        _, _, latent_frames, height, width = latents.shape
        kept = torch.nn.functional.interpolate((1 - mask)[0].transpose(0, 1), size=(height, width), mode="nearest")
        kept = kept.transpose(0, 1)[None]  # (1, 1, F, H', W')
        kept = torch.cat([kept[:, :, :1].repeat_interleave(self.temporal_factor, dim=2), kept[:, :, 1:]], dim=2)
        kept = kept.view(1, latent_frames, self.temporal_factor, height, width).transpose(1, 2)
        return torch.cat([kept.to(latents.dtype), latents], dim=1)[0].to("cpu")

    def _motion_encoder_size(self) -> int:
        """The face video's side: the transformer's `motion_encoder_size` (512 in the release)."""
        if self.transformer is not None:
            return self.transformer.config.motion_encoder_size
        from diffusers import WanAnimateTransformer3DModel

        return WanAnimateTransformer3DModel.load_config(self.config.base_model_name, subfolder="transformer")["motion_encoder_size"]

    def _reference(self, pixels):
        """`WanAnimatePipeline.prepare_reference_image_latents`: one picture's VAE latents (mode), normalised, after a
        mask of ones (4 channels): (20, 1, H', W')."""
        mean, std = self._latent_stats(pixels)
        latents = (self.vae_latents(pixels, mode=True) - mean) / std
        return torch.cat([latents.new_ones(1, 4, *latents.shape[2:]), latents], dim=1)[0].to("cpu")

    def _vace_condition(self, role, frames, companions=None):
        """VACE's conditions, as `WanVACEPipeline.prepare_video_latents` / `prepare_masks` make them.
        control: the VAE latents of the control frames outside the mask, then inside it, normalised (32, F', H', W');
        without a mask (all ones: every frame made anew) that is a black video's latents, then the control's, and the 64
        mask channels, all ones, are added per step; with its `controlmask` (white: made anew) those 64 channels (one per
        pixel of a VAE cell, 8 x 8) follow, (96, F', H', W').
        reference: the picture's latents and as many zeros, (32, 1, H', W'), put before the clip's latent frames."""
        pixels = self.video_pixels(frames)
        mean, std = self._latent_stats(pixels)
        if role == "reference":
            latents = (self.vae_latents(pixels[:, :, :1], mode=True) - mean) / std
            return torch.cat([latents, torch.zeros_like(latents)], dim=1)[0].to("cpu")
        mask_frames = (companions or {}).get("controlmask")
        if mask_frames is None:
            inactive = (self.vae_latents(torch.zeros_like(pixels), mode=True) - mean) / std
            reactive = (self.vae_latents(pixels, mode=True) - mean) / std
            return torch.cat([inactive, reactive], dim=1)[0].to("cpu")
        if len(mask_frames) == 1:  # a picture: the same mask on every frame
            mask_frames = np.repeat(mask_frames, len(frames), axis=0)
        # as the pipeline reads a mask: [-1, 1] pixels → [0, 1]; the frames split where it is over one half
        mask = ((self.video_pixels(mask_frames).float() + 1) / 2).clamp(0, 1).to(pixels.dtype)
        kept = torch.where(mask > 0.5, 1.0, 0.0).to(pixels.dtype)
        inactive = (self.vae_latents(pixels * (1 - kept), mode=True) - mean) / std
        reactive = (self.vae_latents(pixels * kept, mode=True) - mean) / std
        return torch.cat([inactive, reactive, self._vace_mask(mask[0, 0], inactive.shape[2]).to(inactive.dtype)[None]],
                         dim=1)[0].to("cpu")

    @no_grad
    def encode_stand_in(self, role, frames, size):
        """VACE without a control video, as `WanVACEPipeline.preprocess_conditions` makes one for `video=None`: zeros
        in [-1, 1] (grey), its mask all ones, so both halves are that grey video's latents (32, F', H', W'); the 64 mask
        channels (ones) are added per step, as for a control without a mask."""
        grey = torch.zeros(1, 3, frames, *size, device=self.device)
        mean, std = self._latent_stats(grey)
        latents = (self.vae_latents(grey, mode=True) - mean) / std
        return torch.cat([latents, latents], dim=1)[0].to("cpu")

    def _vace_mask(self, mask: torch.Tensor, latent_frames: int) -> torch.Tensor:
        """(F, H, W) mask in [0, 1] → VACE's 64 mask channels on the latent grid: each pixel of an 8 x 8 VAE cell a
        channel, frames picked nearest-exact (`WanVACEPipeline.prepare_masks`)."""
        factor = self.vae_compression(self.config.model_type)[0]
        frames, height, width = mask.shape
        cells = mask.reshape(frames, height // factor, factor, width // factor, factor)
        cells = cells.permute(2, 4, 0, 1, 3).flatten(0, 1)
        return torch.nn.functional.interpolate(cells[None], size=(latent_frames, height // factor, width // factor),
                                               mode="nearest-exact")[0]

    def _vace_context(self, controls: list, references: list | None = None) -> torch.Tensor:
        """The transformer's `control_hidden_states`: each clip's control latents and VACE's 64 mask channels (all
        ones without a mask: every frame is generated), after its reference's latents and zero mask channels."""
        factor = self.vae_compression(self.config.model_type)[0]
        rows = []
        for control, reference in zip(controls, references or [None] * len(controls)):
            if control.shape[0] < factor * factor:  # no mask cached with it (32 channels, not 32 + 64)
                control = torch.cat([control, control.new_ones(factor * factor, *control.shape[1:])])
            if reference is not None:
                control = torch.cat([torch.cat([reference, reference.new_zeros(factor * factor, *reference.shape[1:])]),
                                     control], dim=1)
            rows.append(control)
        return torch.stack(rows)

    @property
    def trains_last_frame(self) -> bool:
        return self.config.last_frame_conditioning_probability > 0 and self.takes_last_frame(self.config.model_type)

    def clip_extra_names(self):
        if self.is_animate:
            return ("first_frame_reference",)
        if not self.trains_last_frame:
            return ()
        return ("last_frame", "last_image_embeds") if self.is_flf2v else ("last_frame",)

    @no_grad
    def clip_extras(self, frames):
        """First and last frame: the condition channels of the clip's own first and last frames, beside the
        first-frame ones its latents carry (a step picks one or the other). Animate: the clip's first frame as its
        reference picture, for a clip without a `-reference` one."""
        if self.is_animate:
            return {"first_frame_reference": self._reference(self.video_pixels(frames[:1]))}
        if not self.trains_last_frame:
            return {}
        pixels = self.video_pixels(frames)
        mean, std = self._latent_stats(pixels)
        extras = {"last_frame": self._image_condition(pixels, mean, std, last=True)[0].to("cpu")}
        if self.is_flf2v:  # CLIP of the last frame, beside the first frame's (`encode_first_frame`)
            extras["last_image_embeds"] = self.encode_first_frame(frames[-1])
        return extras

    def split_conditioning(self, stored, generator, image_embeds=None, extras=None) -> tuple[torch.Tensor, Conditioning | None]:
        if self.is_vace:  # every clip has a control that fits, or a reference and the grey stand-in (`encode_stand_in`)
            references = extras.get("reference") or [None] * len(stored)
            if len({reference is None for reference in references}) > 1:
                raise ValueError("WAN 2.1 VACE: a batch mixes clips with and without a -reference picture, whose latents "
                                 "differ in length (batches are grouped by `layout_roles`, so this is a bug)")
            if references[0] is not None:  # the references' latents lead the clip's, as the pipeline denoises them
                channels = stored.shape[1]
                stored = torch.cat([torch.stack([r[:channels] for r in references]).to(stored), stored], dim=2)
            return stored, Conditioning(self._vace_context(extras["control"], references),
                                        torch.ones(len(stored), dtype=torch.bool))
        if self.is_animate:
            return self._animate_conditioning(stored, image_embeds, extras)
        if self.is_i2v:
            channels = self.transformers()[0].config.out_channels  # both experts have the same (split: one is loaded)
            rows = torch.ones(len(stored), dtype=torch.bool)
            condition = stored[:, channels:]
            if extras and "last_frame" in extras:  # these samples also get their last frame
                with_last = torch.rand(len(stored), generator=generator) < self.config.last_frame_conditioning_probability
                condition = torch.where(with_last.to(stored.device).view(-1, 1, 1, 1, 1), extras["last_frame"], condition)
            if self.is_flf2v:  # (B, 2, tokens, width): each sample's first and last frame (`predict` lays them out)
                image_embeds = torch.stack([image_embeds, extras["last_image_embeds"].to(image_embeds.device)], dim=1)
            return stored[:, :channels], Conditioning(condition, rows, image_embeds=image_embeds)
        probability = self.config.image_conditioning_probability
        if self.is_ti2v and probability > 0:
            rows = torch.rand(len(stored), generator=generator) < probability
            loss_frames = torch.ones(stored.shape[0], stored.shape[2])
            loss_frames[rows, 0] = 0  # the given first frame is not predicted
            return stored, Conditioning(stored[:, :, :1], rows, loss_frames)
        return stored, None

    def _animate_conditioning(self, stored, image_embeds, extras):
        """(x0, conditioning) of an Animate batch: the reference's slot before the clip's latent frames (its latents as
        x0 there, out of the loss: the pipeline discards that frame), the reference's condition before the clip's; the
        pose latents and face frames as the transformer's own inputs; CLIP's embedding of each clip's reference."""
        from .packing import unpack

        channels = self.transformer.config.out_channels
        references, embeds = list(extras["first_frame_reference"]), list(image_embeds)
        for row, packed in enumerate(extras.get("reference") or []):
            if packed is not None:  # a `-reference` picture beside the clip, in place of its first frame
                reference, embed = unpack(packed[None])
                references[row], embeds[row] = reference[0].to(stored), embed[0].to(stored)
        reference = torch.stack(references)
        x0 = torch.cat([reference[:, 4:], stored[:, :channels]], dim=2)
        condition = stored[:, channels:]
        backgrounds = extras.get("background") or []
        if any(b is not None for b in backgrounds):  # replace mode: the background and kept-mask in place of the empty video
            condition = torch.stack([c if b is None else b.to(c) for c, b in zip(condition, backgrounds)])
        loss_frames = torch.ones(x0.shape[0], x0.shape[2])
        loss_frames[:, 0] = 0
        inputs = {"pose": torch.stack(extras["pose"]), "face": torch.stack(extras["face"])}
        return x0, Conditioning(torch.cat([reference, condition], dim=2), torch.ones(len(stored), dtype=torch.bool),
                                loss_frames, torch.stack(embeds), inputs)

    def _latent_stats(self, like: torch.Tensor):
        shape = (1, self.vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(self.vae.config.latents_mean, device=like.device, dtype=like.dtype).view(shape)
        std = torch.tensor(self.vae.config.latents_std, device=like.device, dtype=like.dtype).view(shape)
        return mean, std

    # --- training ------------------------------------------------------------------------------
    def trained_experts(self) -> list[Expert]:
        experts = []
        for name in self.expert_names:
            if not self.is_a14b:
                label, sigma_range = "", (0.0, 1.0)
            elif name == "transformer":
                label, sigma_range = "high_noise", (self.boundary_ratio, 1.0)
            else:
                label, sigma_range = "low_noise", (0.0, self.boundary_ratio)
            experts.append(Expert(name, label, getattr(self, name), sigma_range))
        return experts

    def predict(self, noisy, sigma, text, expert, conditioning=None):
        timestep = sigma * 1000.0
        image = {}
        if self.is_vace:
            image = {"control_hidden_states": conditioning.latents.to(noisy.device, self.weight_dtype)}
        elif self.is_animate:  # the face video in [-1, 1], as the pipeline gives it
            face = conditioning.inputs["face"].to(noisy.device, torch.float32) / 127.5 - 1.0
            image = {"encoder_hidden_states_image": conditioning.image_embeds.to(noisy.device, self.weight_dtype),
                     "pose_hidden_states": conditioning.inputs["pose"].to(noisy.device, self.weight_dtype),
                     "face_pixel_values": face.to(self.weight_dtype)}
        elif conditioning is not None and conditioning.image_embeds is not None:
            images = conditioning.image_embeds
            if images.dim() == 4:  # FLF2V: (2B, tokens, width), each sample's first then last, as the pipeline does
                images = images.flatten(0, 1)
            image = {"encoder_hidden_states_image": images.to(noisy.device, self.weight_dtype)}
        if conditioning is not None and (self.is_i2v or self.is_animate):
            noisy = torch.cat([noisy, conditioning.latents.to(noisy.device, noisy.dtype)], dim=1)
        elif conditioning is not None and not self.is_vace:  # TI2V: the clean first frame in place of the noisy one, at timestep 0
            keep_noisy = torch.ones_like(noisy[:, :1])
            keep_noisy[conditioning.rows.to(noisy.device), :, 0] = 0
            noisy = (1 - keep_noisy) * conditioning.latents.to(noisy.device, noisy.dtype) + keep_noisy * noisy
            patch = expert.module.config.patch_size
            timestep = (keep_noisy[:, 0, :, :: patch[1], :: patch[2]] * timestep.view(-1, 1, 1, 1)).flatten(1)
        parallel = getattr(expert.module, "_parallel_config", None)
        if parallel is not None and parallel.context_parallel_config is not None:
            patch, degree = expert.module.config.patch_size, self.config.context_parallel.degree
            tokens = noisy.shape[2] // patch[0] * (noisy.shape[3] // patch[1]) * (noisy.shape[4] // patch[2])
            if tokens % degree:
                raise ValueError(f"context_parallel.degree = {degree}: a clip of {tokens} tokens (latents "
                                 f"{tuple(noisy.shape[2:])}) does not split evenly over the processes; pick a resolution "
                                 "or max_frames whose token count the degree divides")
        # self.weight_dtype, not module.dtype: diffusers computes that by walking every module (ms per call)
        return expert.module(hidden_states=noisy.to(self.weight_dtype), timestep=timestep,
                             encoder_hidden_states=text.to(self.weight_dtype), return_dict=False, **image)[0]

    def set_frame_local_attention(self, expert: Expert, enabled: bool) -> None:
        """`video_config.use_temporal_attention: false`: each block's self-attention (attn1) sees only its
        own latent frame; cross-attention is unchanged. Off again for samples, which use the stock model."""
        module = expert.module
        use_frame_local_attention(module, [block.attn1 for block in module.blocks], module.config.patch_size[0], enabled)

    # --- LoRA ----------------------------------------------------------------------------------
    def lora_default_target(self, name: str) -> bool:
        return bool(_DEFAULT_TARGETS.match(name))

    def save_diffusers_lora(self, directory, weight_name, state_dict, adapter_metadata):
        from diffusers import WanPipeline

        WanPipeline.save_lora_weights(directory, transformer_lora_layers=state_dict, weight_name=weight_name,
                                      transformer_lora_adapter_metadata=adapter_metadata)

    def single_file_state_dict(self, module, dtype, state=None) -> dict:
        """The transformer's weights with original WAN (ComfyUI) names, as `from_single_file` reads them."""
        state = module.state_dict() if state is None else state
        return {original_name(k): v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}

    def comfy_lora_key(self, peft_module_name: str) -> str:
        return f"diffusion_model.{_renamed(peft_module_name, _COMFY_RENAMES)}"

    def comfy_lora_keeps_alpha(self, peft_module_name: str) -> bool:
        """diffusers' converter for original-layout WAN LoRAs scales by `.alpha` inside the blocks only, and refuses
        a leftover `.alpha` elsewhere (embeddings, head): there alpha / rank goes into lora_B instead."""
        return peft_module_name.startswith("blocks.")

    # --- sampling ------------------------------------------------------------------------------
    @no_grad
    def sample(self, request: SampleRequest) -> np.ndarray:
        """One video from the stock pipeline. On an accelerator its parts take turns on the device (an 8 GB GPU holds
        the 5B transformer or the VAE decoding, not both): the VAE (and CLIP) to encode a given first frame; the
        transformer to denoise (A14B: each expert swapped in when the pipeline first calls it); the VAE alone to
        decode, in tiles when whole frames would not fit (`wan_decode.decode_in_tiles`), as `estimate` models it."""
        from diffusers import WanImageToVideoPipeline, WanPipeline

        from .wan_decode import decode_in_tiles

        def before_decoding(pipeline, step, timestep, tensors):
            if step == pipeline.num_timesteps - 1:  # the pipeline decodes next
                self._take_turn("vae")
                tiles, whole, free = decode_in_tiles(self.vae, tuple(tensors["latents"].shape[2:]), self.device)
                if tiles:
                    logging.getLogger("motiontune").info(
                        "sample: decoding in tiles (whole frames need %.1f GB, %.1f GB free)", whole / 2**30, free / 2**30)
                    self.vae.enable_tiling()
            return tensors

        dtype = self.weight_dtype
        negative = request.negative_prompt_embeds
        # the encoders' turn first where the pipeline encodes before it denoises: a first frame, Animate's reference,
        # VACE's control video (and reference picture)
        with self.taking_turns(first_frame=request.image is not None or self.is_animate or self.is_vace):
            parts = dict(tokenizer=None, text_encoder=None, vae=self.vae, scheduler=self.scheduler,
                         transformer=self.transformer, transformer_2=self.transformer_2,
                         boundary_ratio=self.boundary_ratio, expand_timesteps=self.expand_timesteps)
            image = {"num_frames": request.frames}
            if self.is_animate:  # a character picture moved by the pose and face videos, in one segment
                from diffusers import WanAnimatePipeline
                from PIL import Image

                for name in ("transformer_2", "boundary_ratio", "expand_timesteps"):
                    parts.pop(name)
                pipeline = WanAnimatePipeline(image_encoder=self.image_encoder, image_processor=self.image_processor, **parts)
                image = {"image": Image.fromarray(request.reference), "segment_frame_length": request.frames,
                         "pose_video": [Image.fromarray(frame) for frame in request.pose[: request.frames]],
                         "face_video": [Image.fromarray(frame) for frame in request.face[: request.frames]]}
                if request.background is not None:  # replace mode: the character made over the background, where masked
                    image.update(mode="replace",
                                 background_video=[Image.fromarray(frame) for frame in request.background[: request.frames]],
                                 mask_video=[Image.fromarray(frame) for frame in request.character_mask[: request.frames]])
            elif self.is_vace:  # follows the sample's control video (and its mask, and a reference picture)
                from diffusers import WanVACEPipeline
                from PIL import Image

                parts.pop("expand_timesteps")
                pipeline = WanVACEPipeline(**parts)
                if request.control is not None:  # else a reference alone: the pipeline's grey video, as trained
                    image.update(video=[Image.fromarray(frame) for frame in request.control])
                if request.control_mask is not None:
                    image["mask"] = [Image.fromarray(frame) for frame in request.control_mask[: len(request.control)]]
                if request.reference is not None:
                    image["reference_images"] = [Image.fromarray(request.reference)]
            elif request.image is not None:  # image-to-video (I2V models; TI2V-5B when a sample gives an image)
                from PIL import Image

                pipeline = WanImageToVideoPipeline(image_encoder=self.image_encoder, image_processor=self.image_processor,
                                                   **parts)
                image.update(image=Image.fromarray(request.image))
                if request.last_image is not None:
                    image["last_image"] = Image.fromarray(request.last_image)
            else:
                pipeline = WanPipeline(**parts)
            pipeline.set_progress_bar_config(disable=True)
            try:
                video = pipeline(
                    **image, prompt_embeds=request.prompt_embeds.to(self.device, dtype),
                    negative_prompt_embeds=None if negative is None else negative.to(self.device, dtype),
                    height=request.height, width=request.width,
                    num_inference_steps=request.steps, guidance_scale=request.cfg_scale,
                    generator=torch.Generator(device=self.device).manual_seed(request.seed), output_type="np",
                    callback_on_step_end=before_decoding,
                ).frames[0]
            finally:
                self.vae.disable_tiling()  # clips encode whole, always
        return to_uint8(video)

    # --- tiny models (motiontune.testing) --------------------------------------------------------------
    @classmethod
    def tiny_pipeline(cls, name, tokenizer, clips, heads, layers):
        from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanPipeline
        text_dim = 32
        wide_vae = name == "wan-2.2-ti2v-5b"
        vae = tiny_vae(wide_vae)
        calibrate_latent_stats(vae, clips)
        latent_channels = vae.config.z_dim
        # the token width must hold a 2x2 patch of latent channels (64 values; 192 for TI2V-5B's 48 channels)
        heads = heads or (8 if wide_vae else 4)
        two_experts = name in ("wan-2.2-a14b", "wan-2.2-i2v-a14b")
        image_to_video = name in ("wan-2.2-i2v-a14b", "wan-2.1-i2v", "wan-2.1-flf2v")
        vace = name == "wan-2.1-vace"
        if name == "wan-2.2-animate":
            return _tiny_animate(tokenizer, vae, heads or 4, layers, text_dim)
        image_dim = 32 if name in ("wan-2.1-i2v", "wan-2.1-flf2v") else None  # the tiny CLIP vision encoder's width
        # FLF2V: the first and the last frame's CLIP tokens as one sequence (the tiny CLIP: 4 x 4 patches + 1)
        image_tokens = 2 * 17 if name == "wan-2.1-flf2v" else None
        # I2V: the noisy latents plus a 4-channel first-frame mask and the first frame's latents
        in_channels = latent_channels * 2 + 4 if image_to_video else latent_channels
        transformer = _tiny_transformer(in_channels, text_dim, heads=heads, layers=layers, out_channels=latent_channels,
                                        image_dim=image_dim, image_tokens=image_tokens, vace=vace)
        if image_tokens:  # diffusers starts the image positions at zero; a trained model's tell first from last
            torch.nn.init.normal_(transformer.condition_embedder.image_embedder.pos_embed, std=0.5)
        transformer_2 = (_tiny_transformer(in_channels, text_dim, heads=heads, layers=layers, out_channels=latent_channels)
                         if two_experts else None)
        # Wan 2.1 and 2.2 ship with shift 3.0 / 5.0 in their flow-matching scheduler config.
        scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0 if name.startswith("wan-2.2") else 3.0)
        text_encoder = _tiny_umt5(text_dim)
        parts = dict(tokenizer=tokenizer("tokenizer", 512), text_encoder=text_encoder, vae=vae,
                     scheduler=scheduler, transformer=transformer, transformer_2=transformer_2,
                     boundary_ratio=(0.9 if image_to_video else 0.875) if two_experts else None,
                     expand_timesteps=wide_vae)
        if vace:
            from diffusers import WanVACEPipeline

            parts.pop("expand_timesteps")
            return WanVACEPipeline(**parts)
        if not image_to_video:
            return WanPipeline(**parts)
        # WAN 2.2 I2V A14B ships without a CLIP image encoder; WAN 2.1 I2V and FLF2V have one
        image_encoder, image_processor = _tiny_clip_vision(image_dim) if image_dim else (None, None)
        return WanImageToVideoPipeline(image_encoder=image_encoder, image_processor=image_processor, **parts)

    # --- what estimate needs to know (motiontune/estimate asks; nothing here loads weights) ----------------------
    @property
    def transformer_class_name(self):
        return {"WAN_2_1_VACE": "WanVACETransformer3DModel", "WAN_2_2_ANIMATE": "WanAnimateTransformer3DModel"}.get(
            self.config.model_type, "WanTransformer3DModel")
    block_groups = (("num_layers", "blocks"),)  # (config key of the count, the ModuleList) for each kind of block
    text_tokens = MAX_SEQUENCE_LENGTH
    TEXT_ENCODER_CLASSES = {"text_encoder": ("UMT5", "UMT5EncoderModel")}

    def estimate_shorten(self, cfg: dict, short: dict) -> dict:
        """A copy with fewer blocks keeps the VACE blocks that sit beside those (VACE: one per two blocks in 1.3B). The
        activations of the VACE blocks past the simulated ones are not extrapolated: an estimate of VACE runs is low."""
        if "inject_face_latents_blocks" in cfg:  # Animate: a face adapter after the first block of every few, kept
            return dict(short, inject_face_latents_blocks=min(cfg["inject_face_latents_blocks"], short["num_layers"]))
        if "vace_layers" not in cfg:
            return short
        return dict(short, vace_layers=[layer for layer in cfg["vace_layers"] if layer < short["num_layers"]])

    def estimate_release(self, base: str) -> tuple[str, dict[str, dict]]:
        """(Hub id, its parts' configs): `base` when it is a released model, else this model type's."""
        name = base if base in RELEASES else DEFAULT_RELEASE[self.config.model_type]
        if "14B" in base and name == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers":  # WAN 2.1 T2V comes in two sizes
            name = "Wan-AI/Wan2.1-T2V-14B-Diffusers"
        return name, RELEASES[name]

    def estimate_step_inputs(self, cfg: dict, x0: torch.Tensor, dtype: torch.dtype):
        """(cached text rows, conditioning) of a training batch like `x0`, the conditioning at its costliest."""
        batch, _, frames, height, width = x0.shape
        text = torch.zeros(batch, MAX_SEQUENCE_LENGTH, cfg["text_dim"])
        rows = torch.ones(batch, dtype=torch.bool)
        if self.is_i2v:
            latents = x0.new_empty(batch, cfg["in_channels"] - x0.shape[1], frames, height, width)
            per_clip = (2,) if self._images_per_clip(cfg) == 2 else ()  # FLF2V: first and last frame
            images = x0.new_empty(batch, *per_clip, CLIP_IMAGE_TOKENS, cfg["image_dim"]) if cfg.get("image_dim") else None
            return text, Conditioning(latents, rows, image_embeds=images)
        if self.is_ti2v and self.config.image_conditioning_probability > 0:  # a timestep per token
            return text, Conditioning(x0[:, :, :1], rows, x0.new_ones(batch, frames))
        if self.is_vace:
            return text, Conditioning(x0.new_empty(batch, cfg["vace_in_channels"], frames, height, width), rows)
        if self.is_animate:  # x0's first frame is the reference's slot; pose latents and face frames over the rest
            return text, Conditioning(x0.new_empty(batch, cfg["in_channels"] - x0.shape[1], frames, height, width), rows,
                                      None, x0.new_empty(batch, CLIP_IMAGE_TOKENS, cfg["image_dim"]),
                                      self._estimate_animate_inputs(cfg, x0.new_empty, batch, frames - 1, height, width))
        return text, None

    def _estimate_animate_inputs(self, cfg, empty, batch, frames, height, width) -> dict:
        """Animate's pose latents over `frames` latent frames and the face frames they stand for, at the motion
        encoder's size."""
        size = cfg.get("motion_encoder_size", 512)
        return {"pose": empty(batch, cfg.get("latent_channels", 16), frames, height, width),
                "face": empty(batch, 3, (frames - 1) * self.temporal_factor + 1, size, size, dtype=torch.uint8)}

    def estimate_sample_call(self, cfg: dict, latent: tuple[int, int, int], dtype: torch.dtype) -> dict:
        """One transformer call as the stock pipeline makes it while sampling (batch 1)."""
        f, h, w = latent
        patch = cfg.get("patch_size") or (1, 2, 2)
        tokens = (f // patch[0]) * (h // patch[1]) * (w // patch[2])
        call = {"hidden_states": torch.empty(1, cfg["in_channels"], f, h, w, dtype=dtype),
                "timestep": torch.empty(1, tokens) if self.is_ti2v else torch.empty(1),  # expand_timesteps
                "encoder_hidden_states": torch.empty(1, MAX_SEQUENCE_LENGTH, cfg["text_dim"], dtype=dtype)}
        if cfg.get("image_dim"):
            call["encoder_hidden_states_image"] = torch.empty(
                self._images_per_clip(cfg), CLIP_IMAGE_TOKENS, cfg["image_dim"], dtype=dtype)
        if cfg.get("vace_in_channels"):
            call["control_hidden_states"] = torch.empty(1, cfg["vace_in_channels"], f, h, w, dtype=dtype)
        if self.is_animate:  # one latent frame more (the reference's), the face frames in [-1, 1]
            call["hidden_states"] = torch.empty(1, cfg["in_channels"], f + 1, h, w, dtype=dtype)
            inputs = self._estimate_animate_inputs(cfg, torch.empty, 1, f, h, w)
            call.update(pose_hidden_states=inputs["pose"].to(dtype), face_pixel_values=inputs["face"].to(dtype))
        return call

    @staticmethod
    def _images_per_clip(cfg: dict) -> int:
        """CLIP embeddings per video: FLF2V's transformer reads two (first and last frame) as one sequence."""
        return 2 if cfg.get("pos_embed_seq_len") else 1

    def estimate_decode(self, vae_cfg: dict, latent: tuple[int, int, int], tiled: bool) -> int:
        """Sampling tiles when whole frames would not fit (`sample`): both ways are modelled."""
        from .wan_decode import decode_peak

        return decode_peak(vae_cfg, latent, tiled, self.vae_dtype)

    def estimate_image_encoder_bytes(self) -> int:
        """WAN 2.1 I2V's CLIP ViT-H/14 vision tower, float32, beside the VAE while clips and first frames encode."""
        return 4 * CLIP_VIT_H_PARAMS if self.encodes_first_frame else 0

    def estimate_first_frame(self, frames: int) -> int:
        """Frames the pipeline encodes for a sample's first frame (I2V: with the others empty; TI2V-5B: alone)."""
        return 1 if self.is_ti2v else frames


# --- the released models, for `motiontune estimate` on a Hub id not on this machine ---------------------------------
CLIP_IMAGE_TOKENS = 257  # WAN 2.1 I2V: CLIP's tokens for the first frame
CLIP_VIT_H_PARAMS = 632_076_800  # WAN 2.1 I2V's image encoder (CLIP ViT-H/14 vision tower)
# Hub id → its parts' configs (A14B: both experts have that transformer; text_encoder: google/umt5-xxl's encoder; vae {}:
# AutoencoderKLWan's defaults, WAN 2.1's), and model_type → the release estimated for a base_model_name not known here
_RELEASE_DATA = json.loads((Path(__file__).parent / "releases" / "wan.json").read_text())
RELEASES, DEFAULT_RELEASE = _RELEASE_DATA["releases"], _RELEASE_DATA["default_release"]


def tiny_vae(wide: bool):
    from diffusers import AutoencoderKLWan

    common = dict(dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True])
    if wide:  # Wan 2.2 VAE: 48 channels, 16x spatial (patchified 2x on top of 8x), residual blocks
        return AutoencoderKLWan(base_dim=16, decoder_base_dim=16, z_dim=48, is_residual=True, in_channels=12,
                                out_channels=12, patch_size=2, scale_factor_spatial=16, **common).eval()
    return AutoencoderKLWan(base_dim=8, z_dim=16, **common).eval()


@no_grad
def calibrate_latent_stats(vae, clips) -> None:
    """latents_mean/latents_std from the VAE's own encodings of the clips, as the real WAN statistics were measured
    on data: normalised latents are then about N(0, 1) per channel, and a missing or wrong normalisation shows up
    in training results."""
    latents = [vae.encode(clip).latent_dist.mean for clip in clips]
    stacked = torch.cat(latents).transpose(0, 1).flatten(1)  # channels × values
    vae.register_to_config(latents_mean=[round(v, 4) for v in stacked.mean(1).tolist()],
                           latents_std=[round(v, 4) for v in stacked.std(1).tolist()])


def _tiny_umt5(text_dim: int):
    from transformers import UMT5Config, UMT5EncoderModel

    return UMT5EncoderModel(UMT5Config(  # vocab >= the tokenizer's
        vocab_size=256, d_model=text_dim, d_kv=8, d_ff=2 * text_dim, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0)).eval()


def _tiny_animate(tokenizer, vae, heads: int, layers: int, text_dim: int):
    """WAN 2.2 Animate: an I2V-shaped transformer (36 channels in, CLIP image tokens) with its pose embedding, a motion
    encoder for 16-pixel face frames (512 in the release) and a face adapter after every block (every 5th there); the
    stock pipeline's UniPC scheduler in its flow form, with the release's shift."""
    from diffusers import UniPCMultistepScheduler, WanAnimatePipeline, WanAnimateTransformer3DModel

    image_dim = 32
    transformer = WanAnimateTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=24, in_channels=36, latent_channels=16,
        out_channels=16, text_dim=text_dim, freq_dim=32, ffn_dim=4 * heads * 24, num_layers=layers, image_dim=image_dim,
        added_kv_proj_dim=heads * 24, rope_max_seq_len=64, motion_encoder_channel_sizes={"4": 16, "8": 16, "16": 8},
        motion_encoder_size=16, motion_style_dim=16, motion_dim=8, motion_encoder_dim=16, face_encoder_hidden_dim=16,
        face_encoder_num_heads=2, inject_face_latents_blocks=1)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
    image_encoder, image_processor = _tiny_clip_vision(image_dim)
    return WanAnimatePipeline(tokenizer=tokenizer("tokenizer", 512), text_encoder=_tiny_umt5(text_dim), vae=vae,
                              scheduler=scheduler, image_processor=image_processor, image_encoder=image_encoder,
                              transformer=transformer)


def _tiny_clip_vision(width: int):
    """A tiny CLIP vision encoder and its image processor (WAN 2.1 I2V uses a ViT-H/14 at 224 px)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    encoder = CLIPVisionModel(CLIPVisionConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                                               num_attention_heads=2, image_size=32, patch_size=8)).eval()
    return encoder, CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def _tiny_transformer(in_channels: int, text_dim: int, *, heads: int, layers: int, out_channels: int, image_dim=None,
                      image_tokens=None, vace: bool = False):
    from diffusers import WanTransformer3DModel, WanVACETransformer3DModel

    # WAN 2.1 I2V: cross-attention also attends to the CLIP image tokens, through its own key/value projections
    image = {"image_dim": image_dim, "added_kv_proj_dim": heads * 24, "pos_embed_seq_len": image_tokens} if image_dim else {}
    if vace:  # a VACE block beside every block; its input: control latents (2 x 16) and 8 x 8 mask channels
        image = {"vace_layers": list(range(layers)), "vace_in_channels": 2 * out_channels + 64}
    cls = WanVACETransformer3DModel if vace else WanTransformer3DModel
    return cls(**image, patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=24,
                                 in_channels=in_channels, out_channels=out_channels, text_dim=text_dim, freq_dim=32,
                                 ffn_dim=4 * heads * 24, num_layers=layers, cross_attn_norm=True,
                                 qk_norm="rms_norm_across_heads", rope_max_seq_len=64)
