"""The text `motiontune estimate` prints: the step's breakdown, the other moments, whether it fits each card and
the cheapest changes when it does not; and OneTrainer's WAN 2.2 table (`--seed-table`)."""

from __future__ import annotations

from ..config import TrainConfig
from .advice import cheapest_changes, smallest_floor
from .result import CAPTIONS, DECODING, DENOISING, ENCODING, FIRST_FRAME, GB, QUANTIZED, Estimate
from .shapes import make_shape
from .step import estimate

SEED_TABLE = [  # the original guide (the OneTrainer fork's docs/VideoTraining.md, "WAN 2.2 Memory Requirements";
    (8, 1, 8, 384),  # docs/WAN22Training.md has the same table): GPU size → batch × frames × resolution²
    (16, 2, 16, 512),
    (24, 4, 16, 512),
    (48, 8, 32, 768),
]
def _gb(value: int) -> str:
    return f"{value / GB:.1f}"


def _table(rows: list[list[str]], header: list[str], left: tuple[int, ...] = ()) -> list[str]:
    """Columns aligned: the first, the last and those in `left` to the left, the others (figures) to the right."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def fmt(row):
        return "  ".join(str(c).ljust(w) if i in (0, len(row) - 1, *left) else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    return [fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]


def report(config: TrainConfig, name: str, gpu_gb: float | None = None, seed_table: bool = False,
           processes: int = 1) -> str:
    """The text `motiontune estimate` prints (`processes`: the torchrun world size a fine-tune is sharded over)."""
    result = estimate(config, phases=True, processes=processes)
    options = result.options
    out = [f"{name}: {config.model_type}, {config.training_method}"
           + (f" rank {config.lora_rank}" if config.training_method == "LORA" else "")
           + f", {config.train_dtype}, checkpointing {options.checkpointing}"
           + (f", layer offloading {options.offload_fraction:g}" if options.offload_fraction else "")
           + (f", {options.weight_dtype} weights" if options.weight_dtype in QUANTIZED else "")
           + (f", {options.compute_dtype} compute" if options.compute_dtype else "")
           + f", {options.optimizer}"
           + (", experts_on split" if config.experts_on == "split" else "")
           + (f", context parallel {config.context_parallel.attention} x{config.context_parallel.degree}"
              if config.context_parallel.degree > 1 else "")
           + (f", FSDP2 over {result.processes} processes" if result.processes > 1 else "")
           + (" (each process)" if config.experts_on == "split" or config.context_parallel.degree > 1
              or result.processes > 1 else ""),
           f"  batch: {result.shape.describe()}",
           f"  model: {result.source} (no weights read)",
           "",
           "Training step, at its peak (GB = 2^30 bytes):"]
    rows = [[line.name, _gb(line.device), _gb(line.host) if line.host else "", line.note] for line in result.lines]
    rows.append(["total", _gb(result.device), _gb(result.host) if result.host else "", ""])
    out += ["  " + r for r in _table(rows, ["part", "device", "host", ""])]
    for phase, title in PHASE_TITLES.items():
        if phase in result.phases:
            lines = result.phases[phase]
            out += ["", title]
            out += ["  " + r for r in _table([[l.name, _gb(l.device), l.note] for l in lines] +
                                             [["total", _gb(sum(l.device for l in lines)), ""]], ["part", "device", ""])]
    if result.host_moments:
        out += ["", "Host memory (RAM), at the moments that hold most of it:"]
        rows = [[moment, _gb(sum(l.host for l in lines)), "; ".join(f"{l.name} {_gb(l.host)}" for l in lines if l.host)]
                for moment, lines in result.host_moments.items()]
        out += ["  " + r for r in _table(rows, ["moment", "host", ""])]
    sizes = [gpu_gb] if gpu_gb else [8, 16, 24, 48]
    out += ["", f"Does the training step fit {gpu_gb:g} GB? And the other moments of the run?" if gpu_gb
            else "Does the training step fit? And the other moments of the run?",
            f"  (fits: within {1 - result.headroom:.0%} of the card; the rest is headroom for other programs and "
            "allocator spikes)"]
    fit_rows, hows = [], []
    for size in sizes:
        budget = int(size * GB)
        others = other_moments(result, budget)
        if result.fits(budget):
            fit_rows.append([f"{size:g} GB", "yes", others, f"{_gb(result.usable(budget) - result.device)} GB to spare"])
            continue
        changes = cheapest_changes(config, budget, processes=result.processes)
        if changes:
            best = changes[0]
            fit_rows.append([f"{size:g} GB", "no", others, f"fits with {best.describe()} ({_gb(best.estimate.device)} GB)"])
            hows.append(f"  {size:g} GB: " + " ".join(f"--set {s}" for s in best.overrides))
            if gpu_gb and len(changes) > 1:
                hows += [f"  or: {c.describe()} ({_gb(c.estimate.device)} GB): " + " ".join(f"--set {s}" for s in c.overrides)
                         for c in changes[1:]]
        else:
            floor = smallest_floor(config, processes=result.processes)
            fit_rows.append([f"{size:g} GB", "no", others, f"not with any memory option (at least {_gb(floor.device)} GB at "
                             "this batch): fewer frames, a lower resolution or a smaller batch"])
    header = ["GPU", "step fits", "other moments", "cheapest change for the step"]
    out += ["  " + r for r in _table(fit_rows, header, left=(2,))]
    if hows:
        out += ["", "The changes, as overrides for `motiontune train`:"] + hows
    if seed_table:
        out += ["", "OneTrainer's WAN 2.2 table (GPU: batch × frames × resolution²), with this config's model and method:"]
        out += ["  " + r for r in _table(seed_rows(config), ["GPU", "seed's setting", "as configured", "fits",
                                                              "cheapest change that fits"])]
    return "\n".join(out)


PHASE_TITLES = {
    ENCODING: "Encoding clips, before training (a first run, or latent_caching off):",
    CAPTIONS: "Encoding captions, before training (a first run):",
    FIRST_FRAME: "Rendering a sample, encoding its first frame (the transformer waits in host memory):",
    DENOISING: "Rendering a sample, denoising (the VAE waits in host memory):",
    DECODING: "Rendering a sample, decoding (the transformer waits in host memory):",
}


def other_moments(result: Estimate, gpu_bytes: int) -> str:
    """Whether every moment of the run other than the training step fits a card of `gpu_bytes`; those that do not."""
    over = [f"{name} {_gb(peak)} GB" for name in result.phases if (peak := result.phase_peak(name, gpu_bytes)) > result.usable(gpu_bytes)]
    if over:
        return "no: " + ", ".join(over)
    return "yes" + (" (decoding samples in tiles)" if result.decodes_in_tiles(gpu_bytes) else "")


def seed_rows(config: TrainConfig) -> list[list[str]]:
    rows = []
    for size, batch, frames, side in SEED_TABLE:
        shape = make_shape(config, batch, frames, side, side)
        result = estimate(config, shape=shape)
        budget = int(size * GB)
        setting = f"{batch} × {frames} × {side}²" + (f" ({shape.frames} frames)" if shape.frames != frames else "")
        if result.fits(budget):
            rows.append([f"{size} GB", setting, f"{_gb(result.device)} GB", "yes", ""])
            continue
        changes = cheapest_changes(config, budget, shape, limit=1)
        if changes:
            rows.append([f"{size} GB", setting, f"{_gb(result.device)} GB", "no",
                         f"{changes[0].describe()}: {_gb(changes[0].estimate.device)} GB"])
        else:
            floor = smallest_floor(config, shape)
            rows.append([f"{size} GB", setting, f"{_gb(result.device)} GB", "no",
                         f"nothing fits (at least {_gb(floor.device)} GB)"])
    return rows
