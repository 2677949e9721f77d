"""The training config: OneTrainer-style keys, validated by pydantic.

Every key is either built, or accepted only at its neutral value and rejected otherwise (see
`NOT_SUPPORTED_YET`), so no setting is ever silently ignored.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from .concepts import ConceptConfig, LocalPath, TextConfig  # noqa: F401  (OneTrainer's concept format, in its own module)
from .resolution import parse_resolution

# The formats each training method saves as (methods/*.py write them), and the one used when
# output_model_format is not set.
OUTPUT_FORMATS = {"LORA": ("DIFFUSERS_LORA", "COMFY_LORA"), "FINE_TUNE": ("DIFFUSERS", "COMFY_TRANSFORMER"),
                  "EMBEDDING": ("SAFETENSORS",)}
DEFAULT_OUTPUT_FORMAT = {"LORA": "COMFY_LORA", "FINE_TUNE": "DIFFUSERS", "EMBEDDING": "SAFETENSORS"}
DType = Literal["FLOAT_32", "BFLOAT_16", "FLOAT_16", "FLOAT_8", "NFLOAT_4"]
TimeUnit = Literal["NEVER", "STEP", "EPOCH"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelPartConfig(Strict):
    """One model part (`transformer`, `transformer_2`, `text_encoder`, `vae`), OneTrainer's newer form."""

    train: bool = True
    model_name: LocalPath = ""  # a folder or single .safetensors file that replaces this part of base_model_name
    weight_dtype: DType | None = None  # None: follow train_dtype
    # the dtype the block Linears' matmuls run in (torchao's float8 / int8 training; weights stay in weight_dtype);
    # None: the train dtype. Transformers only (docs/memory.md, "FLOAT_8 and INT_8 compute")
    compute_dtype: Literal["FLOAT_8", "INT_8"] | None = None
    gradient_checkpointing: bool | None = None
    offload_fraction: float = Field(0.0, ge=0, le=1)
    activation_offloading: bool = False
    dropout_probability: float = Field(0.0, ge=0, le=1)  # text_encoder only: captions left out (CFG training)
    learning_rate: float | None = Field(None, gt=0)  # this part's own learning rate (default: learning_rate)
    # this transformer stops after this many optimizer steps; with two WAN 2.2 experts the other one then gets
    # every noise level's share of the steps until it reaches its own count or the epochs end
    max_steps: int | None = Field(None, ge=1)
    # the noise levels (σ, the shifted one the transformer sees) this transformer trains on, inside its share of
    # them (WAN 2.2 A14B: the high-noise expert's [boundary, 1], the low-noise one's [0, boundary)); None: all of it
    min_noising_strength: float | None = Field(None, ge=0, le=1)
    max_noising_strength: float | None = Field(None, ge=0, le=1)

    @model_validator(mode="after")
    def _noise_range(self):
        low, high = self.min_noising_strength, self.max_noising_strength
        if low is not None and high is not None and low >= high:
            raise ValueError(f"min_noising_strength ({self.min_noising_strength}) must be below max_noising_strength "
                             f"({self.max_noising_strength})")
        return self


class OptimizerConfig(Strict):
    optimizer: Literal["ADAMW", "ADAMW_8BIT", "ADAFACTOR", "PRODIGY", "SGD"] = "ADAMW"
    weight_decay: float = Field(0.01, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)


class SampleConfig(Strict):
    prompt: str
    negative_prompt: str = ""
    frames: int = Field(17, ge=1)
    height: int = Field(480, ge=16)
    width: int = Field(832, ge=16)
    seed: int = 42
    steps: int = Field(30, ge=1)
    cfg_scale: float = Field(5.0, ge=1.0)
    fps: float = Field(16.0, gt=0)
    image: LocalPath | None = None  # image-to-video: the first frame (required by I2V models, optional for TI2V-5B)
    last_image: LocalPath | None = None  # first and last frame: the last frame (models that take one; with `image`)
    control: LocalPath | None = None  # a control video the sample follows (models that take one: VACE; docs/control.md)
    control_mask: LocalPath | None = None  # VACE: which part of each control frame is made anew (white); with `control`
    pose: LocalPath | None = None  # WAN 2.2 Animate: the pose video the character follows (docs/control.md)
    face: LocalPath | None = None  # WAN 2.2 Animate: the face video (a crop around the face) its expressions come from
    # a reference picture: VACE's (a character, an object the video keeps), or WAN 2.2 Animate's character
    reference: LocalPath | None = None
    # WAN 2.2 Animate's replace mode: a background video the character is made over, where `character_mask` is white
    background: LocalPath | None = None
    character_mask: LocalPath | None = None


class FrozenLoraConfig(Strict):
    """A LoRA file merged, frozen, into the base before a new LoRA trains over it (a speed LoRA: docs/formats.md,
    "using your LoRA with a speed LoRA"). Read in motiontune's, diffusers' or ComfyUI's naming."""

    model_name: LocalPath = Field(min_length=1)  # a .safetensors LoRA file
    strength: float = 1.0  # the weight it is used with (diffusers' `set_adapters` weight, ComfyUI's strength)
    # which transformer it adapts: WAN 2.2 A14B's low-noise expert is transformer_2; None: transformer, or for A14B
    # what the file's name says (motiontune's `_high_noise` / `_low_noise` suffixes)
    part: Literal["transformer", "transformer_2"] | None = None


class VideoConfig(Strict):
    max_frames: int = Field(16, ge=1)
    frame_sample_strategy: Literal["uniform", "random", "keyframe"] = "uniform"
    clips_per_file: int = Field(1, ge=1, le=1000)  # clip windows taken from each video
    # random windows / temporal augmentation: 0 draws anew every epoch (encoded every epoch); N cycles N cached draws
    window_variants: int = Field(0, ge=0, le=1000)
    target_fps: float = Field(24.0, gt=0, le=240)
    max_duration: float = Field(10.0, gt=0)
    temporal_consistency_weight: float = Field(1.0, ge=0, le=2)
    use_temporal_attention: bool = True
    spatial_compression_ratio: int = Field(8, ge=1, le=64)
    temporal_compression_ratio: int = Field(4, ge=1, le=16)
    video_batch_size_multiplier: float = Field(0.5, gt=0, le=8)
    frame_dropout_probability: float = Field(0.0, ge=0, le=0.3)
    temporal_augmentation: bool = False


class ContextParallelConfig(Strict):
    """Each clip's tokens split over `degree` processes under torchrun (docs/distributed.md): `ulysses` exchanges
    attention heads (all-to-all), `ring` passes keys and values around (CUDA, or the CPU
    through PyTorch's CPU flash-attention kernel)."""

    degree: int = Field(1, ge=1)
    attention: Literal["ulysses", "ring"] = "ulysses"


class EmbeddingConfig(Strict):
    """One textual-inversion embedding (OneTrainer's `embedding` / `additional_embeddings` entries): new tokens
    added to the text encoder's vocabulary, written in captions as `placeholder`, whose vectors train."""

    uuid: str = ""  # OneTrainer's id for the embedding; not used
    model_name: LocalPath = ""  # a saved embedding (.safetensors) to start from instead of initial_embedding_text
    placeholder: str = Field("<embedding>", min_length=1)
    train: bool = True  # False: the vectors from model_name are used as they are
    token_count: int | None = Field(1, ge=1, le=64)  # None: as many as model_name's file holds
    initial_embedding_text: str = "*"  # the new vectors start as this text's token embeddings
    is_output_embedding: bool = False
    stop_training_after: int | None = None  # OneTrainer's; not built (refused unless null)
    stop_training_after_unit: TimeUnit = "NEVER"


class TrainConfig(Strict):
    version: int | None = Field(None, alias="__version")

    model_type: str = "WAN_2_1_T2V"  # the model to train (each model family lists the types it serves)
    training_method: Literal["LORA", "FINE_TUNE", "EMBEDDING"] = "LORA"
    base_model_name: LocalPath = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    train_device: Literal["auto", "cuda", "cpu", "mps"] = "auto"

    concepts: list[ConceptConfig] | None = None
    concept_file_name: LocalPath | None = None

    resolution: str = "480"
    latent_caching: bool = True  # latents and text embeddings kept on disk across runs
    # train encodes what the cache lacks in a process of its own (data/encoder_process.py): the training process
    # never loads the VAE or the text encoders for it. With latent_caching off, encoding stays in the training process
    encode_in_child: bool = True
    # auto: `train` chooses the memory options for this machine's GPU and RAM, as `train --gpu-gb N` does (planner.py)
    memory: Literal["manual", "auto"] = "manual"
    cache_dir: LocalPath = "workspace-cache/run"
    aspect_ratio_bucketing: bool = True  # each file trains at the bucket nearest its aspect, same area
    dataloader_threads: int = Field(2, ge=0, le=64)  # worker processes that probe and decode (0: in-process)
    batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    epochs: int = Field(10, ge=1)
    optimizer: OptimizerConfig = OptimizerConfig()
    learning_rate_scheduler: Literal["CONSTANT", "COSINE", "LINEAR"] = "CONSTANT"
    learning_rate_warmup_steps: int = Field(0, ge=0)
    clip_grad_norm: float | None = Field(1.0, gt=0)
    train_dtype: DType = "BFLOAT_16"
    # torch.compile each transformer block (OneTrainer's key): faster steps after a first step that compiles
    compile: bool = False

    # OneTrainer's older form of the memory options; the newer form lives inside each model part.
    gradient_checkpointing: Literal["OFF", "ON", "CPU_OFFLOADED"] | None = None
    layer_offload_fraction: float | None = Field(None, ge=0, le=1)
    # offloaded blocks allowed on the device at once: the one computing and those copied ahead of it
    layer_offload_prefetch: int = Field(2, ge=1)

    # WAN 2.2 A14B: which expert(s) to train; None follows transformer.train / transformer_2.train
    experts: Literal["both", "high", "low"] | None = None
    boundary_ratio: float | None = Field(None, gt=0, lt=1)  # default: the model's own (0.875 for T2V, 0.9 for I2V)
    # WAN 2.2 A14B with both experts under torchrun: "together" (every process holds both and swaps them) or
    # "split" (half the processes hold and train the high-noise expert, the other half the low-noise one)
    experts_on: Literal["together", "split"] = "together"
    # sequence (context) parallelism: torchrun's processes form groups of `degree` that share each clip's tokens
    context_parallel: ContextParallelConfig = ContextParallelConfig()
    # WAN 2.2 TI2V-5B: the share of samples trained image-to-video (first frame given, left out of the
    # loss); the rest train text-to-video. Image-to-video models always condition on the first frame.
    image_conditioning_probability: float = Field(0.0, ge=0, le=1)
    # image-to-video models that take a last frame too (WAN 2.2 I2V A14B; WAN 2.1 FLF2V, which needs 1): the share of
    # samples trained from the clip's own first and last frames; the rest from the first frame alone (docs/control.md)
    last_frame_conditioning_probability: float = Field(0.0, ge=0, le=1)
    # LTX-2 / 2.3 / 2.5 in-context LoRA (IC-LoRA): each clip's `-control` video goes in as clean extra tokens beside
    # the noisy ones, as `LTX2InContextPipeline`'s reference_conditions (docs/control.md)
    in_context_control: bool = False
    # with in_context_control: the control is encoded at 1/N of the clip's height and width, its positions scaled by N,
    # as `LTX2InContextPipeline(reference_downscale_factor=N)` (fewer control tokens: N² times fewer)
    reference_downscale_factor: int = Field(1, ge=1, le=8)
    # HunyuanVideo (guidance-distilled): the guidance value its transformer is trained and sampled with
    guidance_scale: float = Field(1.0, ge=0)

    transformer: ModelPartConfig = ModelPartConfig()
    transformer_2: ModelPartConfig = ModelPartConfig(train=False)
    text_encoder: ModelPartConfig = ModelPartConfig(train=False)
    vae: ModelPartConfig = ModelPartConfig(train=False)

    # textual inversion: `embedding` trains in an EMBEDDING run; `additional_embeddings` train beside any method
    embedding: EmbeddingConfig = EmbeddingConfig()
    additional_embeddings: list[EmbeddingConfig] = []
    embedding_learning_rate: float | None = Field(None, gt=0)  # default: learning_rate
    preserve_embedding_norm: bool = False
    embedding_weight_dtype: DType = "FLOAT_32"  # the vectors train in float32

    # OneTrainer's PeftType: LORA, LOHA (Hadamard product of two low-rank pairs), LOKR (Kronecker product);
    # OFT_2 is refused (not built)
    peft_type: Literal["LORA", "LOHA", "LOKR", "OFT_2"] = "LORA"
    lora_rank: int = Field(16, ge=1, le=1024)  # LORA and LOHA (LOKR: lokr_dim)
    lora_alpha: float = Field(1.0, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    lora_decompose: bool = False  # DoRA: LORA with a trained magnitude per output row (peft's use_dora)
    lora_decompose_norm_epsilon: bool = True  # OneTrainer's key; peft's DoRA norm has no epsilon (see docs/config.md)
    # peft's DoRA normalises each output row: OneTrainer's `true`; None (unset) means the same; false is refused
    lora_decompose_output_axis: bool | None = None
    lokr_dim: int = Field(16, ge=1, le=1024)  # LOKR: the rank of its decomposed Kronecker factor
    lokr_decompose_both: bool = False  # LOKR: the first Kronecker factor low-rank too
    lokr_decompose_factor: int = Field(-1, ge=-1)  # LOKR: -1 splits each dimension near its square root
    # OneTrainer's other LoKr options, accepted at their defaults only (NOT_SUPPORTED_YET)
    lokr_use_tucker: bool = False
    lokr_weight_decompose: bool = False
    lokr_dora_on_output: bool = True
    lokr_full_matrix: bool = False
    lokr_vec_trick: bool = True
    layer_filter: str = ""  # comma-separated substrings of module names; empty: the family's default targets
    # LoRA files merged into the frozen base before training (speed LoRAs); the saved file holds only the new LoRA
    frozen_loras: list[FrozenLoraConfig] = []

    timestep_distribution: Literal["UNIFORM", "LOGIT_NORMAL", "SIGMOID"] = "LOGIT_NORMAL"
    timestep_shift: float = Field(1.0, gt=0, le=100)
    noising_weight: float = Field(0.0, ge=-0.99, le=10)  # normal's scale is 1 + noising_weight
    noising_bias: float = Field(0.0, ge=-10, le=10)  # normal's mean
    # the noise levels (shifted σ) the whole run trains on; each transformer may narrow its own (`transformer.`...)
    min_noising_strength: float = Field(0.0, ge=0, le=1)
    max_noising_strength: float = Field(1.0, ge=0, le=1)
    # how a range limits the distribution: RESCALE squeezes the whole of it into the range (OneTrainer's way),
    # CUT keeps only its part inside the range, its shape there unchanged (musubi-tuner's --preserve_distribution_shape)
    noising_strength_mode: Literal["RESCALE", "CUT"] = "RESCALE"
    seed: int = 42

    # Sound, for a family that generates it with the video (docs/config.md, "Sound"). train_audio false trains the
    # video alone even when clips have sound: no audio is read or denoised, the LoRA has no audio keys and the
    # model's sound is left as it was.
    train_audio: bool = True
    audio_loss_weight: float = Field(1.0, ge=0)  # the audio's flow loss is added to the video's times this
    # INDEPENDENT: the audio's noise level is a draw of its own (LTX-2's trainer draws each modality apart);
    # SHARED: the video's noise level (the audio and video of a sample equally noisy)
    audio_noise_level: Literal["INDEPENDENT", "SHARED"] = "INDEPENDENT"

    output_model_destination: LocalPath = "models/lora.safetensors"
    # LoRA: DIFFUSERS_LORA, COMFY_LORA; fine-tune: DIFFUSERS (a transformer folder), COMFY_TRANSFORMER (one file)
    # embedding: SAFETENSORS (one file of vectors per embedding)
    # default by training_method (DEFAULT_OUTPUT_FORMAT): COMFY_LORA loads in ComfyUI and in diffusers alike
    output_model_format: Literal["DIFFUSERS_LORA", "COMFY_LORA", "DIFFUSERS", "COMFY_TRANSFORMER", "SAFETENSORS"] = "COMFY_LORA"
    output_dtype: DType | None = None  # fine-tune saves; default: the weights' dtype
    workspace_dir: LocalPath = "workspace/run"

    sample_after: int = Field(1, ge=0)
    sample_after_unit: TimeUnit = "EPOCH"
    samples: list[SampleConfig] = []
    # the steps and guidance of every sample that does not set its own (e.g. 4 and 1.0 under a speed LoRA)
    sample_steps: int | None = Field(None, ge=1)
    sample_cfg_scale: float | None = Field(None, ge=1.0)
    save_every: int = Field(0, ge=0)
    save_every_unit: TimeUnit = "NEVER"
    # a loss on the VALIDATION concepts' clips (never trained on) at fixed noise levels and noise, every N units
    validation: bool = False
    validate_after: int = Field(1, ge=0)
    validate_after_unit: TimeUnit = "EPOCH"
    backup_after: int = Field(30, ge=0)
    backup_after_unit: Literal["NEVER", "STEP", "EPOCH", "MINUTE"] = "MINUTE"
    rolling_backup: bool = False  # keep only the newest rolling_backup_count backups
    rolling_backup_count: int = Field(3, ge=1)
    backup_before_save: bool = True
    continue_last_backup: bool = False  # as `motiontune train --resume`
    max_nonfinite_steps: int = Field(5, ge=1)  # steps in a row with a NaN/inf loss or gradient before the run stops

    # masked training, OneTrainer's keys and defaults: a clip's `<stem>-masklabel.<ext>` mask weighs its loss
    masked_training: bool = False
    unmasked_probability: float = Field(0.1, ge=0, le=1)  # the chance a sample trains without its mask
    unmasked_weight: float = Field(0.1, ge=0, le=1)  # the loss weight outside the mask (1: as without a mask)
    normalize_masked_area_loss: bool = False  # each sample's loss divided by its mask's mean weight

    video_config: VideoConfig = VideoConfig()

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _parts_over_their_defaults(cls, data):
        """A part section given in part is laid over that part's own defaults, as OneTrainer lays a file over its
        defaults: `"text_encoder": {"weight_dtype": "FLOAT_8"}` must not switch the text encoder's training on."""
        if isinstance(data, dict):
            for part in ("transformer", "transformer_2", "text_encoder", "vae"):
                section = data.get(part)
                if isinstance(section, dict) and "train" not in section:
                    data = {**data, part: {**section, "train": cls.model_fields[part].default.train}}
        return data

    @model_validator(mode="before")
    @classmethod
    def _format_follows_method(cls, data):
        """An unset output_model_format follows training_method, so a pasted FINE_TUNE or EMBEDDING config saves
        in its own method's format."""
        if isinstance(data, dict) and data.get("output_model_format") is None:
            method = data.get("training_method", "LORA")
            if isinstance(method, str) and method in DEFAULT_OUTPUT_FORMAT:  # a wrong method is reported by its own field
                data = {**data, "output_model_format": DEFAULT_OUTPUT_FORMAT[method]}
        return data

    @field_validator("model_type")
    @classmethod
    def _served_model_type(cls, value: str, info: ValidationInfo):
        """Which model types exist is the families' to say, in a layer above this one: it validates with the
        context {"model_types": ...} (motiontune/configure.py), and an unknown one reads as a wrong choice."""
        known = (info.context or {}).get("model_types")
        if known and value not in known:
            close = difflib.get_close_matches(value, known, n=1, cutoff=0.6)
            hint = f". Did you mean {close[0]!r}?" if close else ""
            listed = f"{', '.join(repr(k) for k in known[:-1])} or {known[-1]!r}"
            raise PydanticCustomError("literal_error", "Input should be {expected}" + hint, {"expected": listed})
        return value

    @field_validator("resolution", mode="before")
    @classmethod
    def _resolution_text(cls, value):
        if isinstance(value, int):
            return str(value)
        return value

    @field_validator("resolution")
    @classmethod
    def _resolution_form(cls, value: str):
        parse_resolution(value)
        return value

    @model_validator(mode="after")
    def _sample_defaults(self):
        """`sample_steps` / `sample_cfg_scale` fill the samples that do not set their own."""
        for sample in self.samples:
            for key, value in (("steps", self.sample_steps), ("cfg_scale", self.sample_cfg_scale)):
                if value is not None and key not in sample.model_fields_set:
                    setattr(sample, key, value)
        return self

    @model_validator(mode="after")
    def _check(self):
        # neither is checked where the data is read (a config for `estimate` needs no dataset)
        if self.concepts is not None and self.concept_file_name is not None:
            raise ValueError("set only one of `concepts` and `concept_file_name`, not both")
        if self.min_noising_strength >= self.max_noising_strength:
            raise ValueError(f"min_noising_strength ({self.min_noising_strength}) must be below max_noising_strength "
                             f"({self.max_noising_strength})")
        return self

    @property
    def memory_config_form(self) -> str:
        """Which OneTrainer form of the memory options this config used."""
        old = self.gradient_checkpointing is not None or self.layer_offload_fraction is not None
        new = any(
            part.gradient_checkpointing is not None or part.offload_fraction or part.activation_offloading
            for part in (self.transformer, self.transformer_2)
        )
        if old and new:
            return "mixed"
        return "older (top-level gradient_checkpointing)" if old else "newer (per-part)" if new else "default"

    def expert_choice(self) -> str | None:
        """For WAN 2.2 A14B: "both", "high" or "low" (None when no expert is chosen)."""
        if self.experts is not None:
            return self.experts
        high, low = self.transformer.train, self.transformer_2.train
        return "both" if high and low else "high" if high else "low" if low else None

    def use_gradient_checkpointing(self) -> bool:
        return MemoryPlan.of(self).checkpointing != "OFF"

    def resolution_hw(self) -> tuple[int, int]:
        return parse_resolution(self.resolution)


# Keys whose behaviour is not built yet: each accepted only at its neutral value.
# (dotted key, neutral value, which piece of work builds it)
NOT_SUPPORTED_YET: list[tuple[str, object, str]] = [
    ("output_dtype", (None, "FLOAT_32", "BFLOAT_16", "FLOAT_16"), "FLOAT_8/NFLOAT_4 saves"),
    ("train_dtype", ("FLOAT_32", "BFLOAT_16", "FLOAT_16"),
     "FLOAT_8 and NFLOAT_4 store weights, they do not compute: set transformer.weight_dtype"),
    ("text_encoder.offload_fraction", 0.0, "text encoder layer offloading"),
    ("text_encoder.activation_offloading", False, "text encoder activation offloading"),
    ("embedding.is_output_embedding", False, "output embeddings"),
    ("preserve_embedding_norm", False, "embedding norm preservation"),
    ("embedding_weight_dtype", "FLOAT_32", "embeddings in other dtypes"),
    ("vae.train", False, "VAE training"),
    ("text_encoder.compute_dtype", None, "low-precision compute in the text encoder: it applies to the transformers"),
    ("vae.compute_dtype", None, "low-precision compute in the VAE: it applies to the transformers"),
    ("vae.weight_dtype", (None, "FLOAT_32", "BFLOAT_16", "FLOAT_16"), "a VAE stored as FLOAT_8 / NFLOAT_4"),
    ("transformer.dropout_probability", 0.0, "it applies to text_encoder only"),
    ("transformer_2.dropout_probability", 0.0, "it applies to text_encoder only"),
    ("vae.dropout_probability", 0.0, "it applies to text_encoder only"),
    ("text_encoder.min_noising_strength", None, "it applies to the transformers only"),
    ("text_encoder.max_noising_strength", None, "it applies to the transformers only"),
    ("vae.min_noising_strength", None, "it applies to the transformers only"),
    ("vae.max_noising_strength", None, "it applies to the transformers only"),
    ("peft_type", ("LORA", "LOHA", "LOKR"), "OFT_2 adapters"),
    ("lora_decompose_output_axis", (None, True), "DoRA on the input axis: peft's DoRA normalises each output row"),
    ("lokr_use_tucker", False, "Tucker-decomposed LoKr: it only changes convolutions, which no family adapts"),
    ("lokr_weight_decompose", False, "DoRA on LoKr (lora_decompose works with peft_type LORA)"),
    ("lokr_dora_on_output", True, "DoRA on LoKr"),
    ("lokr_full_matrix", False, "a forced full second LoKr factor"),
    ("lokr_vec_trick", True, "OneTrainer's LoKr forward; peft computes the Kronecker product"),
]


def get_dotted(config: BaseModel, dotted: str):
    value = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


@dataclass(frozen=True)
class MemoryPlan:
    """The memory options of one transformer part, read from either of OneTrainer's config forms."""

    checkpointing: str  # OFF | ON | CPU_OFFLOADED
    offload_fraction: float  # of the blocks whose frozen weights live in host memory
    prefetch: int  # offloaded blocks allowed on the device at once (the one computing and those loading)
    weight_dtype: str  # the part's weight dtype name (FLOAT_8 / NFLOAT_4: quantized storage)
    compute_dtype: str | None = None  # FLOAT_8 / INT_8: the block Linears' matmuls (torchao); None: the train dtype

    @property
    def offloads(self) -> bool:
        """Whether anything waits in host memory (block weights or checkpointed inputs)."""
        return self.offload_fraction > 0 or self.checkpointing == "CPU_OFFLOADED"

    @classmethod
    def of(cls, config: TrainConfig, part_name: str = "transformer") -> "MemoryPlan":
        part = getattr(config, part_name)
        if part.gradient_checkpointing is not None:  # the newer, per-part form
            checkpointing = "OFF" if not part.gradient_checkpointing else "CPU_OFFLOADED" if part.activation_offloading else "ON"
        else:
            checkpointing = config.gradient_checkpointing or "OFF"
            if part.activation_offloading and checkpointing != "OFF":
                checkpointing = "CPU_OFFLOADED"
        fraction = part.offload_fraction or config.layer_offload_fraction or 0.0
        if fraction > 0 and checkpointing == "OFF":
            # without recomputation, backward would keep every block's weights alive on the device
            checkpointing = "ON"
        return cls(checkpointing, fraction, config.layer_offload_prefetch, part.weight_dtype or config.train_dtype,
                   part.compute_dtype)
