"""What an estimate is: the memory options and batch it was made for, and its lines (bytes per part)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..config import TrainConfig
from ..models.wan_decode import TILE_MARGIN

GB = 2**30  # GPU sizes are quoted in GiB (a "24 GB" card holds about 24 × 2^30 bytes)
QUANTIZED = ("FLOAT_8", "NFLOAT_4")  # weight dtypes stored quantized (frozen Linear weights inside the blocks)

# the moments of a run besides the training step
ENCODING, CAPTIONS = "encoding", "captions"
DENOISING, DECODING, FIRST_FRAME = "sample denoising", "sample decoding", "sample first frame"
DECODE_LINE = "VAE decoding the sample"


class EstimateError(Exception):
    """The estimate cannot be made for this config; the message says why."""


@dataclass(frozen=True)
class Options:
    """The memory options of the trained transformer part(s)."""

    checkpointing: str = "OFF"  # OFF | ON | CPU_OFFLOADED
    offload_fraction: float = 0.0
    prefetch: int = 2
    weight_dtype: str = "BFLOAT_16"  # as stored: FLOAT_8 / NFLOAT_4 are quantized frozen Linear weights
    optimizer: str = "ADAMW"
    compute_dtype: str | None = None  # FLOAT_8 / INT_8: the block Linears' matmuls (torchao); weights as stored

    @classmethod
    def of(cls, config: TrainConfig, part_name: str = "transformer") -> "Options":
        """As the trainer reads them (train/memory.py's MemoryPlan: both OneTrainer config forms)."""
        from ..config.schema import MemoryPlan

        plan = MemoryPlan.of(config, part_name)
        return cls(plan.checkpointing, plan.offload_fraction, plan.prefetch, plan.weight_dtype, config.optimizer.optimizer,
                   plan.compute_dtype)

    def effective(self) -> "Options":
        """Layer offloading turns checkpointing on (as train/memory.py does)."""
        if self.offload_fraction > 0 and self.checkpointing == "OFF":
            return replace(self, checkpointing="ON")
        return self


@dataclass(frozen=True)
class Shape:
    """One training batch: clips per step, frames, pixels; and the latent grid the transformer sees."""

    batch: int
    frames: int
    height: int
    width: int
    latent: tuple[int, int, int]  # F', H', W'
    patch: tuple[int, int, int] = (1, 2, 2)

    @property
    def tokens(self) -> int:
        f, h, w = self.latent
        return (f // self.patch[0]) * (h // self.patch[1]) * (w // self.patch[2])

    def describe(self) -> str:
        f, h, w = self.latent
        return (f"{self.batch} × {self.frames} frames × {self.width}x{self.height} "
                f"(latents {f}×{h}×{w}, {self.tokens} tokens per clip)")


@dataclass
class Line:
    """One row of the breakdown: bytes on the training device, and bytes waiting in host memory."""

    name: str
    device: int
    host: int = 0
    note: str = ""


@dataclass
class Estimate:
    config: TrainConfig
    shape: Shape
    options: Options
    device_kind: str  # "cuda" or "cpu" (on the CPU the device is host memory: the two columns are one)
    lines: list[Line]  # the training step's peak
    phases: dict[str, list[Line]] = field(default_factory=dict)  # other moments: encoding, captions, samples
    per_block_activation: int = 0
    blocks: int = 0
    source: str = ""  # where the transformer config came from
    tiled_decode: int = 0  # bytes of decoding the sample in tiles (the "sample decoding" phase counts whole frames)
    headroom: float = 0.0  # the share of a card kept free when saying whether something fits
    host_moments: dict[str, list[Line]] = field(default_factory=dict)  # host memory at the moments of a CUDA run
    processes: int = 1  # a fine-tune sharded with FSDP2 over this many processes: the lines are one process's

    @property
    def host_peak(self) -> int:
        """The most host memory any moment of the run holds (estimate/host.py); 0 when not estimated (the CPU)."""
        return max((sum(line.host for line in lines) for lines in self.host_moments.values()), default=0)

    @property
    def device(self) -> int:
        return sum(line.device for line in self.lines)

    @property
    def host(self) -> int:
        return sum(line.host for line in self.lines)

    @property
    def total(self) -> int:
        """Device + host: what the step needs on a machine where they are the same memory (the CPU)."""
        return self.device + self.host

    def usable(self, gpu_bytes: int) -> int:
        """What of a card of `gpu_bytes` a run may plan to fill: the rest is headroom."""
        return int(gpu_bytes * (1 - self.headroom))

    def phase_peak(self, name: str, gpu_bytes: int | None = None) -> int:
        """A phase's bytes on the device; on a card of `gpu_bytes`, a sample's decoding in tiles when sampling would
        choose them there."""
        peak = sum(line.device for line in self.phases.get(name, []))
        if name == DECODING and gpu_bytes is not None and self.decodes_in_tiles(gpu_bytes):
            peak += self.tiled_decode - self._whole_decode
        return peak

    @property
    def _whole_decode(self) -> int:
        return sum(line.device for line in self.phases.get(DECODING, []) if line.name == DECODE_LINE)

    def decodes_in_tiles(self, gpu_bytes: int) -> bool:
        """Whether sampling decodes in tiles on a card of `gpu_bytes`: models/wan_decode.py does when decoding whole
        frames (with TILE_MARGIN) needs more than the memory the rest of that moment leaves free."""
        if DECODING not in self.phases or self.tiled_decode == self._whole_decode:
            return False
        rest = self.phase_peak(DECODING) - self._whole_decode
        return TILE_MARGIN * self._whole_decode > gpu_bytes - rest

    def fits(self, gpu_bytes: int) -> bool:
        return self.device <= self.usable(gpu_bytes)
