"""The model family interface: everything the trainer may ask of a model family, and the lifecycle every
family shares.

A family module (wan.py, ...) is the only place that knows its model types and their config rules, how its
parts load, how it encodes prompts and pixels, how its transformer is called, how its LoRA keys are named,
which stock diffusers pipeline samples it and how a tiny random copy of it is built. The training loop only
talks to this interface; `registry.py` finds the family that serves a model type.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from ..config import TrainConfig
from ..util.lazy import no_grad, np, torch
from .layout import OriginalLayout
from .loading import ModelLoadError, free_accelerator_memory, load_part, transformer_dtype, vae_dtype


@dataclass
class Expert:
    """One transformer this run trains, and the noise levels it serves."""

    name: str  # the pipeline attribute: "transformer" or "transformer_2"
    label: str  # "" for a single transformer; "high_noise" / "low_noise" for WAN 2.2 A14B
    module: torch.nn.Module
    sigma_range: tuple[float, float]  # [low, high); the top expert's range includes 1.0


@dataclass
class Conditioning:
    """What a batch is conditioned on besides its text: a first (and last) frame, a control video (VACE)."""

    latents: torch.Tensor  # the family's condition tensor, one row per sample
    rows: torch.Tensor  # (B,) bool: the samples that are conditioned
    loss_frames: torch.Tensor | None = None  # (B, F') 1 for latent frames in the loss, 0 for given ones
    image_embeds: torch.Tensor | None = None  # (B, tokens, dim) the first frame through an image encoder
    inputs: dict | None = None  # further transformer inputs by name, one row per sample (Animate's pose and face)

    def select(self, rows: torch.Tensor) -> "Conditioning":
        def pick(tensor):
            return None if tensor is None else tensor[rows.to(tensor.device)]

        inputs = None if self.inputs is None else {name: pick(value) for name, value in self.inputs.items()}
        return Conditioning(pick(self.latents), pick(self.rows), pick(self.loss_frames), pick(self.image_embeds), inputs)


@dataclass
class Sound:
    """The audio latents a family that generates sound denoises with the video: noisy latents (B, ...) and their
    noise levels (B,); a clip without sound has pure noise at level 1 there, and the loss leaves it out."""

    noisy: torch.Tensor
    sigma: torch.Tensor

    def select(self, rows: torch.Tensor) -> "Sound":
        return Sound(self.noisy[rows.to(self.noisy.device)], self.sigma[rows.to(self.sigma.device)])


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
    last_image: np.ndarray | None = None  # first and last frame: the last frame, uint8 (H, W, 3)
    control: np.ndarray | None = None  # a control video's frames, uint8 (F, H, W, 3) (models that take one)
    control_mask: np.ndarray | None = None  # the control's mask frames, uint8 (F, H, W, 3): white is made anew (VACE)
    pose: np.ndarray | None = None  # Animate: the pose video's frames, uint8 (F, H, W, 3)
    face: np.ndarray | None = None  # Animate: the face video's frames, uint8 (F, h, w, 3)
    reference: np.ndarray | None = None  # a reference picture, uint8 (H, W, 3): VACE's, or Animate's character
    background: np.ndarray | None = None  # Animate's replace mode: the background video's frames, uint8 (F, H, W, 3)
    character_mask: np.ndarray | None = None  # and the character's mask over it (white: made), uint8 (F, H, W, 3)
    fps: float | None = None  # the frame rate the video is written at (a family that generates sound needs it)


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """A stock pipeline's frames in [0, 1] → uint8, as samples are saved."""
    return (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)


@no_grad
def calibrate_scaling_factor(vae, clips: list[torch.Tensor]) -> None:
    """A tiny VAE's scaling_factor from its own encodings of the clips (no shift), as real ones were measured."""
    latents = torch.cat([vae.encode(clip).latent_dist.mean for clip in clips])
    vae.register_to_config(scaling_factor=round(1 / latents.std().item(), 4))


class ModelFamily(ABC):
    # --- what the family declares: read before anything loads (the registry, config checks, tiny models) ----
    #: the config's `model_type` values this family serves
    MODEL_TYPES: tuple[str, ...] = ()
    #: how error messages name the family
    NAME: str
    #: the VAE's own compression, (spatial, temporal): a larger ratio downscales / subsamples before encoding
    VAE_COMPRESSION = (8, 4)
    #: whether `text_encoder.weight_dtype` may be FLOAT_8 / NFLOAT_4
    QUANTIZED_TEXT_ENCODER = False
    #: guidance-distilled: the transformer takes the guidance value (`guidance_scale`), in training as when sampling
    GUIDANCE_EMBEDDING = False
    #: the tiny random models `tiny_pipeline` builds (motiontune.testing.tiny_models), by name
    TINY_MODELS: tuple[str, ...] = ()
    #: the stock pipeline class whose `lora_state_dict` reads this family's LoRA files (None: diffusers has none; the
    #: transformer's `load_lora_adapter` then reads DIFFUSERS_LORA files as they are)
    LORA_PIPELINE: str | None = None

    @classmethod
    def tiny_model(cls, model_type: str) -> str:
        """The tiny model that stands in for `model_type` in tests: the one at its place in TINY_MODELS (which lists
        them in MODEL_TYPES' order), or the only one."""
        if len(cls.TINY_MODELS) == 1:
            return cls.TINY_MODELS[0]
        return cls.TINY_MODELS[cls.MODEL_TYPES.index(model_type)]

    @classmethod
    def vae_compression(cls, model_type: str) -> tuple[int, int]:
        return cls.VAE_COMPRESSION

    @classmethod
    def first_frame(cls, model_type: str) -> str | None:
        """Whether a video starts from a given first frame: "required" (image-to-video), "optional" or None."""
        return None

    @classmethod
    def expert_parts(cls, model_type: str) -> tuple[str, ...]:
        """The config's parts that hold a transformer of this model (two: experts that split the noise levels)."""
        return ("transformer",)

    @classmethod
    def takes_last_frame(cls, model_type: str) -> bool:
        """Whether a video can also end on a given last frame (first-and-last-frame image-to-video)."""
        return False

    #: whether the family can train a control video as in-context tokens (`in_context_control`: LTX-2's IC-LoRA)
    IN_CONTEXT_CONTROL = False

    @classmethod
    def condition_roles(cls, config: TrainConfig) -> dict[str, bool]:
        """The conditions beside a clip this run takes (data/conditions.py: "control", "reference", ...), each with
        whether every clip needs one; `encode_condition` makes what its transformer receives of them. Asked of the
        config, not only its model type: a setting may add one (`in_context_control`)."""
        return {}

    #: `context_parallel`: whether the family's transformer can split a clip's tokens over processes (diffusers has a
    #: context-parallel plan for it and `predict` calls it in the plan's form), and the model types that cannot
    CONTEXT_PARALLEL = False
    CONTEXT_PARALLEL_EXCEPT: tuple[str, ...] = ()

    def context_parallel_plan(self, module: torch.nn.Module) -> dict:
        """Where `module`'s tokens are split over a context group and gathered again: diffusers' own plan for it
        (`_cp_plan`), unless the family corrects it."""
        return module._cp_plan

    def prepare_context_parallel(self, module: torch.nn.Module, degree: int) -> None:
        """Hooks a family needs on `module` beside its plan, once it is split over `degree` processes (none here)."""

    @classmethod
    def context_parallel_problems(cls, config: TrainConfig) -> list[str]:
        """`context_parallel` with degree > 1: refused by name for a family (or model type) whose transformer cannot,
        and beside the options that need a whole clip in one process."""
        settings = config.context_parallel
        if settings.degree == 1:
            return []
        if not cls.CONTEXT_PARALLEL or config.model_type in cls.CONTEXT_PARALLEL_EXCEPT:
            return [f"  - context_parallel.degree = {settings.degree}: {config.model_type} ({cls.NAME}) cannot split a clip's "
                    "tokens over processes (its transformer has no context-parallel plan in diffusers, or motiontune "
                    "does not call it in that form yet); set degree to 1 and use gradient checkpointing and offloading"]
        problems = []
        if not config.video_config.use_temporal_attention:
            problems.append("  - context_parallel with video_config.use_temporal_attention = false: frame-local attention "
                            "regroups a clip's tokens by frame, which a split sequence cannot; set one of them back")
        if config.experts_on == "split":
            problems.append("  - context_parallel with experts_on = split: the two are not combined yet; use one of them")
        if config.validation:
            problems.append("  - context_parallel with validation: the validation loss runs in one process; set validation "
                            "to false")
        if config.training_method != "LORA":
            problems.append(f"  - context_parallel with training_method {config.training_method}: only LORA is built "
                            "(its gradients are summed over every process)")
        return problems

    @classmethod
    def condition_companions(cls, role: str) -> tuple[str, ...]:
        """Roles read and encoded together with `role` (VACE: a control video with its mask): their files join its
        cache key, and they are not encoded alone."""
        return ()

    @classmethod
    def stand_in_roles(cls, config: TrainConfig) -> dict[str, tuple[str, ...]]:
        """Roles every clip needs (`condition_roles`) that a clip may go without when it has a condition in one of the
        listed roles: the family then makes what its pipeline uses when given none (`encode_stand_in`), from the clip's
        frame count and size alone. VACE: no control video beside a reference picture (the pipeline's grey video)."""
        return {}

    @classmethod
    def paired_roles(cls, config: TrainConfig) -> tuple[tuple[str, str], ...]:
        """Pairs of roles a clip has both of or neither (WAN 2.2 Animate's replace mode: a background video and the
        character's mask); a clip with one alone is skipped, named."""
        return ()

    @classmethod
    def condition_format(cls, config: TrainConfig) -> str:
        """A setting that changes what `encode_condition` makes of the same file (LTX-2: `reference_downscale_factor`),
        named in the conditions' cache keys; "" when none does."""
        return ""

    @classmethod
    def layout_roles(cls, config: TrainConfig) -> tuple[str, ...]:
        """Roles whose presence changes the shape of what a sample gives the transformer (VACE: a reference picture
        adds a latent frame): a batch holds only clips alike in them (`EncodedClip.batch_shape`)."""
        return ()

    @classmethod
    def sample_roles(cls, config: TrainConfig) -> dict[str, bool]:
        """The conditions a sample (`samples[]`) takes, each with whether every sample needs one: those of training
        (`condition_roles`) unless the pipeline asks more of a sample (WAN 2.2 Animate: its reference picture)."""
        return cls.condition_roles(config)

    @classmethod
    def whole_roles(cls, config: TrainConfig) -> tuple[str, ...]:
        """Condition roles this run reads as one picture whole in the frame (`conditions.fitted_whole`: VACE's
        reference) rather than through the clip's crop, flip and rotation like a frame of the clip."""
        return ()

    @classmethod
    def config_problems(cls, config: TrainConfig) -> list[str]:
        """The family's own rules for a config, each a line `  - key: what is wrong; what to do`. This default is a
        family with one transformer; one with more (WAN 2.2 A14B's experts) says its own."""
        problems = []
        if config.experts is not None or config.boundary_ratio is not None or config.experts_on != "together":
            problems.append(f"  - experts / boundary_ratio / experts_on: only WAN 2.2 A14B has experts, not {config.model_type}; "
                            "remove them")
        if config.transformer_2.train:
            problems.append(f"  - transformer_2.train = true: {config.model_type} has no second transformer; set it to false")
        if (config.transformer_2.min_noising_strength, config.transformer_2.max_noising_strength) != (None, None):
            problems.append(f"  - transformer_2.min_noising_strength / max_noising_strength: {config.model_type} has no second "
                            "transformer; set the range on transformer (or for the whole run)")
        if not config.transformer.train and config.training_method != "EMBEDDING":  # an embedding run freezes it anyway
            problems.append(f"  - transformer.train = false: a {config.training_method} run needs the transformer trained; set it to true")
        return problems

    @classmethod
    def tiny_pipeline(cls, name: str, tokenizer, clips: list[torch.Tensor], heads: int | None, layers: int):
        """A tiny random `name` model (one of TINY_MODELS) of the real architecture, as the stock diffusers pipeline
        that saves it. `tokenizer(subfolder, max_length, padding_side="right")` makes a small tokenizer locally;
        `clips` are the bundled clips as pixels in [-1, 1], (1, 3, 9, 64, 64) each at 8 frames per second, to measure
        latent statistics on data as the real ones were."""
        raise NotImplementedError(f"{cls.__name__} has no tiny model")

    # --- an instance: one run's model ----------------------------------------------------------------------
    #: the transformer's input size must be a multiple of this (VAE factor × patch size)
    spatial_multiple: int
    #: frames per latent frame (the VAE's temporal factor); valid clip lengths are 4n+1 for 4
    temporal_factor: int
    #: how clip lengths are rounded, for the log
    frame_rule = "the VAE takes 4n+1"
    #: the diffusers class of the VAE
    VAE_CLASS: str
    vae = transformer = image_encoder = image_processor = None
    #: name → (tokenizer, text encoder) once `load_text_encoder` has run (see `text_encoders`)
    encoders: dict[str, tuple] | None = None

    def __init__(self, config: TrainConfig, device: torch.device | None):
        """`device` None: a family that only answers what the survey asks (frame rule, buckets), as `inspect` uses it."""
        self.config = config
        self.device = device

    @cached_property
    def weight_dtype(self) -> torch.dtype:
        """What the transformer loads and computes in (asked when needed: a torch dtype imports torch)."""
        return transformer_dtype(self.config)

    @cached_property
    def vae_dtype(self) -> torch.dtype:
        """What the VAE loads and encodes in (part of the latent cache's key)."""
        return vae_dtype(self.config)

    @cached_property
    def text_dtype(self) -> torch.dtype:
        """What the text encoder runs in (part of the text cache's key): the weights' on an accelerator, float32 on the CPU."""
        return self.weight_dtype if self.device.type != "cpu" else torch.float32

    def valid_frame_count(self, frames: int) -> int:
        """The largest frame count the VAE accepts that is <= `frames` (4n+1 for a factor of 4)."""
        return ((frames - 1) // self.temporal_factor) * self.temporal_factor + 1 if frames >= 1 else 0

    def latent_frame_count(self, frames: int) -> int:
        """Latent frames the VAE makes of `frames` valid frames (4n+1 → n+1 for a factor of 4)."""
        return (frames - 1) // self.temporal_factor + 1

    #: encoder kind ("vae", "text") → the model parts (subfolders) whose files decide its outputs
    ENCODER_PARTS: dict[str, tuple[str, ...]]
    #: the layout of a cached text row when it is not the encoder's output as is (models/packing.py: several tensors
    #: in one row); part of the text cache's key, so a new layout re-encodes the captions instead of misreading them
    TEXT_FORMAT = ""

    #: `experts_on: split`: the one expert (pipeline attribute) this process loads and trains; None: all of them
    held_expert: str | None = None

    @abstractmethod
    def load_transformers(self) -> None:
        """Load the transformer(s) and scheduler from `config.base_model_name` (or per-part `model_name`)."""

    def load_transformer(self, cls, subfolder: str, part) -> torch.nn.Module:
        """One transformer, frozen: `subfolder` of base_model_name, or the part's `model_name` (a diffusers folder,
        or one .safetensors file in the original or diffusers layout). It stays on the CPU until the trainer has
        applied the memory options (quantization, offloading) and `activate` brings it."""
        base, dtype = self.config.base_model_name, self.weight_dtype
        source = Path(part.model_name)
        if part.model_name and source.suffix == ".safetensors" and source.is_file():
            # The architecture comes from base_model_name's own config: without one, diffusers looks it up on the
            # Hub and would give a WAN 2.2 file WAN 2.1's defaults.
            try:
                module = cls.from_single_file(str(source), config=base, subfolder=subfolder, torch_dtype=dtype)
            except Exception as error:
                raise ModelLoadError(
                    f"{subfolder}.model_name = {str(source)!r}: diffusers could not read this single-file "
                    f"checkpoint with the {subfolder} config of {base!r} ({error}). Use a {self.NAME} checkpoint in "
                    "the original (ComfyUI) or diffusers layout that matches base_model_name."
                ) from None
        elif part.model_name:
            module = load_part(cls, part.model_name, None, dtype=dtype)
        else:
            module = load_part(cls, base, subfolder, dtype=dtype)
        return module.requires_grad_(False)

    #: transformers' (image encoder, its processor, the processor's subfolder) where clips carry an image-encoder
    #: embedding of their first frame (`encodes_first_frame`)
    IMAGE_ENCODER: tuple[str, str, str] | None = None

    def load_vae(self) -> None:
        """Load the VAE (once; in vae.weight_dtype, float32 unless set) and an image encoder (float32, as the stock
        examples run it) and put them on the training device."""
        import diffusers

        base = self.config.base_model_name
        if self.vae is None:
            self.vae = load_part(getattr(diffusers, self.VAE_CLASS), base, "vae", dtype=self.vae_dtype)
            self.vae.requires_grad_(False).eval()
        self.vae.to(self.device)
        if self.encodes_first_frame:
            if self.image_encoder is None:
                import transformers

                encoder, processor, subfolder = self.IMAGE_ENCODER
                self.image_processor = load_part(getattr(transformers, processor), base, subfolder)
                model = load_part(getattr(transformers, encoder), base, "image_encoder", dtype=torch.float32)
                self.image_encoder = model.requires_grad_(False).eval()
            self.image_encoder.to(self.device)

    def video_pixels(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 (F, H, W, 3) frames → (1, 3, F, H, W) float32 in [-1, 1] on the device, as a video VAE reads them."""
        return torch.from_numpy(frames).to(self.device).permute(3, 0, 1, 2).unsqueeze(0).float() / 127.5 - 1.0

    def vae_latents(self, pixels: torch.Tensor, mode: bool = False) -> torch.Tensor:
        """Pixels through the VAE in its own dtype → the posterior's mean (or mode), float32 for what follows."""
        posterior = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        latents = (posterior.mode() if mode else posterior.mean).float()
        if self.vae.dtype == torch.float16 and not torch.isfinite(latents).all():  # float16's range overflowed
            raise ValueError("the VAE in FLOAT_16 overflowed (its latents are not finite); set vae.weight_dtype to "
                             "BFLOAT_16 or FLOAT_32 (nothing was cached from it)")
        return latents

    def release_vae(self) -> None:
        """Free the VAE (and an image encoder)."""
        self.vae = self.image_encoder = self.image_processor = None
        free_accelerator_memory(self.device)

    def park_vae(self) -> None:
        """Move the VAE (and an image encoder) off the training device until samples need it again."""
        for encoder in (self.vae, self.image_encoder):
            if encoder is not None:
                encoder.to("cpu")
        free_accelerator_memory(self.device)

    @abstractmethod
    def load_text_encoder(self) -> None:
        """Load the tokenizer(s) and text encoder(s) into `encoders`."""

    def load_text_model(self, cls, subfolder: str, quantize: str | None = None) -> torch.nn.Module:
        """One text encoder of base_model_name, frozen, in `text_dtype`, on the training device. `quantize`: its
        submodule whose Linears text_encoder.weight_dtype FLOAT_8 / NFLOAT_4 stores quantized (see
        QUANTIZED_TEXT_ENCODER)."""
        model = load_part(cls, self.config.base_model_name, subfolder, dtype=self.text_dtype)
        model.eval().requires_grad_(False)
        storage = self.config.text_encoder.weight_dtype
        if quantize is not None and storage in ("FLOAT_8", "NFLOAT_4"):
            from ..util.quantize import quantize_frozen_linears

            quantize_frozen_linears([getattr(model, quantize)], storage, self.device)
        return model.to(self.device)

    def encode_prompts(self, prompts: list[str], grad: bool = False) -> torch.Tensor:
        """Text embeddings exactly as the stock pipeline computes them, one float32 row per prompt. `grad`: with the
        autograd graph, on the training device (a text encoder or embedding that trains); else on the CPU."""
        with torch.set_grad_enabled(grad):
            encoded = self._encode(prompts)
        return encoded.float() if grad else encoded.detach().to("cpu", torch.float32)

    @abstractmethod
    def _encode(self, prompts: list[str]) -> torch.Tensor:
        """The prompts through the text encoder(s), on the training device: what `encode_prompts` returns."""

    def text_encoders(self) -> dict[str, tuple]:
        """name → (tokenizer, text encoder), loaded if need be: what embeddings and text-encoder training use. The
        names key saved files (ComfyUI's names for the family's encoders)."""
        if self.encoders is None:
            self.load_text_encoder()
        return self.encoders

    def release_text_encoder(self) -> None:
        """Free the text encoder(s) once every prompt the run needs is encoded."""
        self.encoders = None
        free_accelerator_memory(self.device)

    @abstractmethod
    def encode_video(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 (F, H, W, 3) frames → normalised latents (C, F', H', W') as the pipeline's denoiser sees them."""

    #: the audio VAE's sample rate when the family generates sound with the video (None: video only); clips are then
    #: decoded with their sound, resampled to this rate and AUDIO_CHANNELS channels over each clip's time window
    AUDIO_SAMPLE_RATE: int | None = None
    AUDIO_CHANNELS = 2

    def encode_audio(self, waveform: np.ndarray, frames: int, fps: float) -> torch.Tensor:
        """float32 (AUDIO_CHANNELS, samples) over a clip of `frames` frames at `fps` → normalised audio latents as
        the denoiser sees them (`audio_latent_shape`)."""
        raise NotImplementedError(f"{type(self).__name__} generates no sound")

    def audio_latent_shape(self, frames: int, fps: float) -> tuple[int, ...]:
        """The shape of one clip's audio latents (what a clip without sound is given as noise)."""
        raise NotImplementedError(f"{type(self).__name__} generates no sound")

    @abstractmethod
    def trained_experts(self) -> list[Expert]:
        """The transformer(s) this run trains (two for WAN 2.2 A14B with experts: both)."""

    def transformers(self) -> list[torch.nn.Module]:
        """Every transformer loaded, trained or not (a second one: WAN 2.2 A14B's low-noise expert)."""
        return [m for m in (self.transformer, getattr(self, "transformer_2", None)) if m is not None]

    def route(self, sigma: torch.Tensor) -> list[tuple[Expert, torch.Tensor]]:
        """Each trained expert with the batch rows whose noise level it serves."""
        routed = []
        for expert in self.trained_experts():  # split experts: one held elsewhere comes with module None
            low, high = expert.sigma_range
            rows = ((sigma >= low) & ((sigma < high) | (high >= 1.0))).nonzero().flatten()
            if len(rows):
                routed.append((expert, rows))
        return routed

    def activate(self, expert: Expert) -> None:
        """Put `expert` on the training device; on an accelerator, the other transformers wait on the CPU."""
        self._bring(expert.module)

    def _bring(self, module: torch.nn.Module) -> None:
        if getattr(self, "_active", None) is module:  # `.to()` walks every module even when nothing moves
            return
        self._active = module
        if self.device.type != "cpu":
            for other in self.transformers():
                if other is not module:
                    other.to("cpu")
        module.to(self.device)

    def fsdp_units(self, module: torch.nn.Module) -> list[torch.nn.Module]:
        """The parts FSDP2 shards one by one (each gathered just before its forward): the transformer blocks."""
        return list(module.blocks)

    #: whether clips carry an image-encoder embedding of their first frame (`encode_first_frame`)
    encodes_first_frame: bool = False

    def encode_first_frame(self, frame: np.ndarray) -> torch.Tensor:
        """The image encoder's embedding of a clip's first frame, as the stock pipeline computes it."""
        raise NotImplementedError(f"{type(self).__name__} has no image encoder")

    def encode_condition(self, role: str, frames: np.ndarray, companions: dict[str, np.ndarray] | None = None) -> torch.Tensor:
        """A clip's condition in `role` (`condition_roles`), uint8 (F, H, W, 3) through the clip's geometry, and those of
        its `condition_companions` the clip has (role → frames) → what is cached for it and given to
        `split_conditioning` as `conditions[role]`."""
        raise NotImplementedError(f"{type(self).__name__} takes no {role} condition")

    def encode_stand_in(self, role: str, frames: int, size: tuple[int, int]) -> torch.Tensor:
        """What the pipeline uses in `role` when it is given nothing there (`stand_in_roles`), for a clip of `frames`
        frames at `size` = (height, width): cached and given to `split_conditioning` as `encode_condition`'s is."""
        raise NotImplementedError(f"{type(self).__name__} makes no stand-in {role} condition")

    def clip_extra_names(self) -> tuple[str, ...]:
        """Tensors the family makes from a clip's own frames and caches beside its latents (`clip_extras`)."""
        return ()

    def clip_extras(self, frames: np.ndarray) -> dict[str, torch.Tensor]:
        """uint8 (F, H, W, 3) frames → the tensors named by `clip_extra_names` (a first-and-last-frame condition)."""
        return {}

    def split_conditioning(self, stored: torch.Tensor, generator: torch.Generator,
                           image_embeds: torch.Tensor | None = None,
                           extras: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, Conditioning | None]:
        """A batch of cached latents (and first-frame image embeddings, and the batch's `clip_extras` stacked) →
        (the latents to denoise, what they are conditioned on). Text-only families return (stored, None);
        `generator` draws which samples are conditioned where that varies."""
        return stored, None

    @abstractmethod
    def predict(self, noisy: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor, expert: Expert,
                conditioning: Conditioning | None = None, sound: Sound | None = None):
        """The expert's flow prediction for noisy latents at noise levels `sigma` (B,). A family that generates sound
        is given `sound` and returns (video prediction, audio prediction)."""

    def set_frame_local_attention(self, expert: Expert, enabled: bool) -> None:
        """Self-attention within each latent frame only (use_temporal_attention: false)."""
        raise NotImplementedError(f"{type(self).__name__} has no frame-local attention")

    # --- LoRA and save formats -----------------------------------------------------------------------------
    def lora_target_modules(self, module: torch.nn.Module, layer_filter: str) -> list[str]:
        """Names of the Linear modules of `module` a LoRA adapts: those `layer_filter` (comma-separated substrings)
        names, or the family's default targets when it is empty."""
        filters = [f.strip() for f in layer_filter.split(",") if f.strip()]
        return [name for name, sub in module.named_modules()
                if isinstance(sub, torch.nn.Linear) and self.lora_may_adapt(name)
                and (any(f in name for f in filters) if filters else self.lora_default_target(name))]

    def lora_may_adapt(self, name: str) -> bool:
        """Whether a LoRA may adapt this Linear at all, whatever the filter."""
        return True

    def may_train(self, name: str) -> bool:
        """Whether a fine-tune may train this weight of the transformer (False: frozen whatever the filter)."""
        return True

    @abstractmethod
    def lora_default_target(self, name: str) -> bool:
        """Whether this Linear is among the family's default LoRA targets."""

    def lora_metadata(self, config: TrainConfig) -> dict[str, str]:
        """safetensors metadata a LoRA file of this run carries besides its own (a setting its loaders read)."""
        return {}

    @abstractmethod
    def save_diffusers_lora(self, directory: str, weight_name: str, state_dict: dict, adapter_metadata: dict) -> None:
        """Write a LoRA in the format the stock pipeline's `load_lora_weights` reads."""

    #: the original layout where it fuses diffusers modules (None: each module is its own original one)
    ORIGINAL_LAYOUT: OriginalLayout | None = None

    def single_file_state_dict(self, module: torch.nn.Module, dtype: torch.dtype, state: dict | None = None) -> dict:
        """A transformer's weights (or `state`, its gathered state dict) named as the family's original
        single-file checkpoints (ComfyUI's), as `from_single_file` reads them. This default: ORIGINAL_LAYOUT's names,
        or diffusers' names where they are the original ones."""
        state = module.state_dict() if state is None else state
        if self.ORIGINAL_LAYOUT is not None:
            return self.ORIGINAL_LAYOUT.state_dict(state, dtype)
        return {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}

    def single_file_metadata(self, module: torch.nn.Module) -> dict[str, str] | None:
        """The safetensors metadata of that single file, where the original checkpoints carry some that loaders read
        (LTX-2.3's options); None: none."""
        return None

    def original_module(self, name: str) -> tuple[str, tuple[str, ...]]:
        """A diffusers module → its original module and the diffusers modules that one holds, in order."""
        return self.ORIGINAL_LAYOUT.original_module(name) if self.ORIGINAL_LAYOUT is not None else (name, (name,))

    def comfy_lora_key(self, peft_module_name: str) -> str:
        """The ComfyUI name of one adapted module (without `.lora_A.weight`). This default: its original module's."""
        return f"diffusion_model.{self.original_module(peft_module_name)[0]}"

    def comfy_lora_parts(self, peft_module_name: str) -> list[str]:
        """The diffusers modules that the original module named by `comfy_lora_key` fuses, in its order (the adapted
        module alone where the original layout fuses nothing)."""
        return list(self.original_module(peft_module_name)[1])

    @abstractmethod
    def comfy_lora_keeps_alpha(self, peft_module_name: str) -> bool:
        """Whether the original-layout entry keeps a `.alpha` key (else alpha / rank is folded into lora_B): it
        must be what both diffusers' converter and ComfyUI's loader accept there."""

    # --- sampling ------------------------------------------------------------------------------------------
    @abstractmethod
    def sample(self, request: SampleRequest):
        """Render a video with the stock diffusers pipeline; uint8 (F, H, W, 3), or with its sound track
        (frames, float32 (channels, samples), sample rate) for a family that generates sound."""

    @contextmanager
    def taking_turns(self, first_frame: bool):
        """While a sample renders: the VAE (and an image encoder) loaded, and the parts taking turns on the
        accelerator (`_take_turn`): the encoders first where a first frame is given, each transformer when the pipeline
        calls it, the VAE when it decodes; the VAE parked after."""
        if self.vae is None or (self.encodes_first_frame and self.image_encoder is None):
            self.load_vae()
        self._sample_turn = None
        self._take_turn("encoders" if first_frame else "transformer", self.transformers()[0])
        hooks = [m.register_forward_pre_hook(lambda module, args: self._take_turn("transformer", module))
                 for m in self.transformers()]
        hooks.append(self.vae.decoder.register_forward_pre_hook(lambda module, args: self._take_turn("vae")))
        # a pipeline that encodes with the VAE while the transformer has the device (a condition the family did not
        # announce as `first_frame`) gets the VAE there too, rather than host weights meeting device pixels
        hooks.append(self.vae.encoder.register_forward_pre_hook(
            lambda module, args: self._take_turn("encoders") if self._sample_turn == "transformer" else None))
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()
            self.park_vae()
            self._sample_turn = None

    def _take_turn(self, turn: str, expert: torch.nn.Module | None = None) -> None:
        """Whose turn it is on the accelerator while a sample renders: "encoders" (the VAE and an image encoder),
        "transformer" (`expert`) or "vae"; the others wait on the CPU. On the CPU (one memory) nothing moves, nor
        does a sharded (FSDP2) model."""
        from ..util.ranks import is_sharded

        if turn != getattr(self, "_sample_turn", None) and self.device.type != "cpu":
            encoders = [m for m in (self.vae, self.image_encoder) if m is not None]
            taking = [m for m in encoders if turn == "encoders" or (turn == "vae" and m is self.vae)]
            if turn != "transformer" and not is_sharded(self.transformer.parameters()):
                for module in self.transformers():
                    module.to("cpu")
                self._active = None  # training's `activate` brings its expert back
            for module in encoders:
                if module not in taking:
                    module.to("cpu")
            free_accelerator_memory(self.device)  # what left is free before what comes arrives
            for module in taking:
                module.to(self.device)
        self._sample_turn = turn
        if turn == "transformer":
            self._bring(expert)  # a no-op when it is there already (this runs before every forward)

    # --- what estimate needs to know: the defaults (a family declares the rest at the end of its file) ------------
    #: a video VAE reads (1, 3, F, H, W); an image family's reads (1, 3, H, W) and sets this False
    VIDEO_VAE = True
    #: each text encoder's subfolder → (how estimate names it, its transformers class)
    TEXT_ENCODER_CLASSES: dict[str, tuple[str, str]] = {}

    def estimate_text_encoders(self, configs: dict[str, dict]) -> list[tuple[str, torch.nn.Module]]:
        """The text encoders on the meta device, from their configs (released or the local folder's)."""
        import transformers

        encoders = []
        with torch.device("meta"):
            for subfolder, (name, class_name) in self.TEXT_ENCODER_CLASSES.items():
                cls = getattr(transformers, class_name)
                encoders.append((name, cls(cls.config_class(**configs[subfolder]))))
        return encoders

    def estimate_vae(self, cfg: dict) -> torch.nn.Module:
        """The family's VAE class on the meta device from `cfg`, in vae.weight_dtype (as `load_vae` loads it)."""
        import diffusers

        from .fake_memory import init_kwargs

        cls = getattr(diffusers, self.VAE_CLASS)
        with torch.device("meta"):
            return cls(**init_kwargs(cfg, cls)).to(self.vae_dtype)

    def estimate_pixels(self, frames: int, height: int, width: int) -> tuple[int, ...]:
        """The pixel tensor the VAE encodes for one clip (or frame)."""
        return (1, 3, frames, height, width) if self.VIDEO_VAE else (1, 3, height, width)

    def estimate_decode(self, vae_cfg: dict, latent: tuple[int, int, int], tiled: bool) -> int:
        """Peak bytes of decoding one sample's latents (F', H', W'). The stock pipelines decode whole frames unless
        told otherwise, so `tiled` changes nothing here; a family whose sampling tiles says otherwise."""
        from .fake_memory import simulate_no_grad

        shape = (1, vae_cfg.get("latent_channels", 16), *(latent if self.VIDEO_VAE else latent[1:]))
        return simulate_no_grad((self.VAE_CLASS, "decode", str(vae_cfg), latent, self.vae_dtype), lambda: self.estimate_vae(vae_cfg),
                                lambda: (torch.empty(shape, dtype=self.vae_dtype),), lambda vae, z: vae.decode(z).sample)
