"""What a dataset of N clips costs before the first step, per epoch, on resume and in memory, for several N,
and how each figure grows with N (the exponent b of a fit  figure ≈ a·N^b: 1 is linear, 0 flat).

For each N a folder of N short synthetic files is written with PyAV (motiontune.testing.clips.write_mixed_dataset:
three codecs, four sizes, four frame rates, ~4 % rotated, ~10 % images, ~2 % broken), then, each measurement in a
fresh process so its peak RSS is its own:

  inspect          `motiontune inspect FOLDER` (summary), with no probe cache, then again with it
  survey           survey_dataset(), the survey `train` runs before any model loads, cold and warm
  fill             Encoding.clips() on an empty cache with the tiny WAN 2.1 model (decode + VAE encode + write),
                   against the decoder alone (the same clips through the same workers) and the VAE alone
                   (already decoded clips, a sample of up to 200)
  step overhead    a cached epoch's work outside the model, per step: the epoch's batch plan, reading the batch's
                   latents and caption embeddings from the cache, picking captions (median over up to 300 steps)
  train / resume   `motiontune train` for 6 steps with a backup at step 3, then `--resume` of that backup for the
                   rest: wall time of each process and its peak RSS

Peak RSS is ru_maxrss of the measured process tree (the largest single process: the main one here). CPU time
(user + sys of the process and its children) is printed too: on a loaded machine it is steadier than wall time.

    nice -n 10 .venv/bin/python benchmarks/large_dataset.py --sizes 100 1000 10000 [--root /tmp/large-dataset]

`--again N [--repeats 3]` measures only the second survey of an unchanged folder of N files against the first
(`inspect` and the survey in train, in turns, with the load average before each), and prints each repetition and
the medians.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT_DEFAULT = Path("/tmp/motiontune-large-dataset")


def config_keys(root: Path, n: int, **extra) -> dict:
    return {
        "model_type": "WAN_2_1_T2V", "base_model_name": str(root / "tiny-wan"),
        "concepts": [{"path": str(root / f"clips-{n}")}], "resolution": "32", "epochs": 1, "batch_size": 1,
        "learning_rate": 1e-3, "train_dtype": "FLOAT_32", "lora_rank": 4, "lora_alpha": 4,
        "workspace_dir": str(root / f"workspace-{n}"), "cache_dir": str(root / f"cache-{n}"),
        "output_model_destination": str(root / f"lora-{n}.safetensors"), "sample_after_unit": "NEVER",
        "dataloader_threads": 2, "video_config": {"max_frames": 9, "target_fps": 8.0}, **extra,
    }


def measured(command: list[str], env: dict | None = None) -> dict:
    """Run `command` in a child that reports its wall time, CPU time and the peak RSS of its process tree."""
    probe = ("import json,resource,subprocess,sys,time;t=time.perf_counter();"
             "r=subprocess.run(sys.argv[1:],stdout=subprocess.PIPE,stderr=subprocess.PIPE,text=True);"
             "w=time.perf_counter()-t;u=resource.getrusage(resource.RUSAGE_CHILDREN);"
             "print(json.dumps({'rc':r.returncode,'wall':w,'cpu':u.ru_utime+u.ru_stime,'rss_mb':u.ru_maxrss/1024,"
             "'out':r.stdout[-3000:],'err':r.stderr[-3000:]}))")
    done = subprocess.run([sys.executable, "-c", probe, *command], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    result = json.loads(done.stdout)
    if result["rc"] != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result['err']}")
    return result


def child(mode: str, *args) -> dict:
    """Run one measurement of this file in a fresh process; its JSON answer plus wall/CPU/RSS."""
    result = measured([sys.executable, __file__, "--child", mode, *map(str, args)])
    answer = json.loads(result["out"].strip().splitlines()[-1])
    return {**answer, "wall": result["wall"], "cpu": result["cpu"], "rss_mb": result["rss_mb"]}


# --- measurements run in a child process ---------------------------------------------------------------------
def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (worker pools, once shut down)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _setup(root: Path, n: int, **extra):
    import torch

    from motiontune.config import TrainConfig
    from motiontune.models import family_for

    torch.set_num_threads(1)
    config = TrainConfig.model_validate(config_keys(root, n, **extra))
    return config, family_for(config, torch.device("cpu"))


def child_survey(root: Path, n: int) -> dict:
    from motiontune.data.survey import survey_dataset

    config, family = _setup(root, n)
    start, cpu = time.perf_counter(), cpu_seconds()
    survey = survey_dataset(config, family)
    return {"seconds": time.perf_counter() - start, "cpu_seconds": cpu_seconds() - cpu, "usable": len(survey.usable),
            "files": len(survey.entries)}


def child_fill(root: Path, n: int) -> dict:
    """Cache fill against the decoder alone and the encoder alone (same clips, same workers)."""
    import torch

    from motiontune.data.cache import Cache
    from motiontune.data.latents import Encoding, _decode_job
    from motiontune.data.survey import survey_dataset
    from motiontune.data.workers import map_isolated

    config, family = _setup(root, n)
    survey = survey_dataset(config, family)
    clips = sum(len(e.clips) for e in survey.usable)
    jobs = [(e.info, e.clips, e.size, None) for e in survey.usable]
    start, cpu = time.perf_counter(), cpu_seconds()
    sample = []
    for _, result in map_isolated(_decode_job, jobs, config.dataloader_threads):
        if len(sample) < 200 and not isinstance(result, Exception):
            sample.extend(result[0][: 200 - len(sample)])
    decode, decode_cpu = time.perf_counter() - start, cpu_seconds() - cpu
    family.load_vae()
    start = time.perf_counter()
    with torch.no_grad():
        for frames in sample:
            family.encode_video(frames)
    encode = (time.perf_counter() - start) / len(sample) * clips
    encoding = Encoding(family, config, Cache(config.cache_dir))
    start, cpu = time.perf_counter(), cpu_seconds()
    encoded = encoding.clips(survey)
    fill, fill_cpu = time.perf_counter() - start, cpu_seconds() - cpu
    start = time.perf_counter()
    encoding.texts({c for clip in encoded for c in clip.captions} | {""})
    texts = time.perf_counter() - start
    files = [p for p in Path(config.cache_dir).rglob("*") if p.is_file()]
    return {"clips": clips, "fill": fill, "decode": decode, "encode": encode, "texts": texts, "fill_cpu": fill_cpu,
            "decode_cpu": decode_cpu,
            "cache_mb": sum(p.stat().st_size for p in files) / 1e6, "cache_files": len(files)}


def child_steps(root: Path, n: int) -> dict:
    """A cached epoch's work outside the model, per step, as the training loop does it."""
    import random

    import torch

    from motiontune.data.buckets import epoch_batches
    from motiontune.data.cache import Cache
    from motiontune.data.latents import Encoding
    from motiontune.data.survey import survey_dataset

    config, family = _setup(root, n)
    survey = survey_dataset(config, family)
    encoding = Encoding(family, config, Cache(config.cache_dir))
    clips = encoding.clips(survey)
    embeddings = encoding.texts({c for clip in clips for c in clip.captions})
    assert not encoding.calls, "the cache should be full: run the fill first"
    start = time.perf_counter()
    batches = epoch_batches([c.shape for c in clips], [c.repeats for c in clips], config.batch_size,
                            config.video_config.video_batch_size_multiplier, config.seed, 0)
    plan = (time.perf_counter() - start) / len(batches)
    picks = random.Random(0).sample(range(len(batches)), min(300, len(batches)))
    times = []
    for index in picks:
        start = time.perf_counter()
        batch = batches[index]
        latents = torch.stack([clips[i].latents for i in batch])
        captions = [random.choice(clips[i].captions) for i in batch]
        text = torch.stack([embeddings[c] for c in captions])
        times.append(time.perf_counter() - start)
        del latents, text
    return {"per_step_ms": (statistics.median(times) + plan) * 1000, "steps": len(batches)}


def child_write_config(root: Path, n: int, steps: int) -> dict:
    path = root / f"train-{n}-{steps}.json"
    path.write_text(json.dumps(config_keys(root, n, transformer={"max_steps": steps}, backup_after=3,
                                           backup_after_unit="STEP")))
    return {"path": str(path)}


CHILDREN = {"survey": child_survey, "fill": child_fill, "steps": child_steps, "config": child_write_config}


# --- the driver ----------------------------------------------------------------------------------------------
def prepare(root: Path, n: int) -> dict:
    from motiontune.testing.clips import write_mixed_dataset
    from motiontune.testing.tiny_models import make_tiny_model

    if not (root / "tiny-wan").is_dir():
        make_tiny_model("wan-2.1", root / "tiny-wan")
    folder, marker = root / f"clips-{n}", root / f"clips-{n}.json"
    if not marker.is_file():
        start = time.perf_counter()
        kinds = write_mixed_dataset(folder, n)
        marker.write_text(json.dumps({**kinds, "seconds": time.perf_counter() - start}))
    return json.loads(marker.read_text())


def run_size(root: Path, n: int) -> dict:
    import shutil

    kinds = prepare(root, n)
    for name in (f"cache-{n}", f"workspace-{n}", f"inspect-cache-{n}"):
        shutil.rmtree(root / name, ignore_errors=True)
    row = {"n": n, "kinds": kinds}
    inspect = [sys.executable, "-m", "motiontune", "inspect", str(root / f"clips-{n}"), "--set",
               f"cache_dir={root / f'inspect-cache-{n}'}"]
    row["inspect_cold"] = measured(inspect)
    row["inspect_warm"] = measured(inspect)
    row["survey_cold"] = child("survey", root, n)
    row["survey_warm"] = child("survey", root, n)
    row["fill"] = child("fill", root, n)
    row["steps"] = child("steps", root, n)
    config = child("config", root, n, 6)["path"]
    train = [sys.executable, "-m", "motiontune", "train", "--config"]
    row["train"] = measured([*train, config])
    backups = sorted((root / f"workspace-{n}" / "backup").iterdir())
    row["resume"] = measured([*train, config, "--resume", str(backups[0])])  # the backup at step 3 of 6
    for key in ("inspect_cold", "inspect_warm", "train", "resume"):
        row[key] = {k: v for k, v in row[key].items() if k not in ("out", "err")}
    return row


def run_again(root: Path, n: int, repeats: int) -> str:
    """A second survey of an unchanged folder: `motiontune inspect` with no probes kept, then again, and the survey in
    train the same way, `repeats` times in turn; the 1-minute load average is read before each measurement (on a
    shared machine it says how far to trust the wall times). A table of each repetition and the medians."""
    import shutil

    folder = root / f"clips-{n}"
    if not folder.is_dir():  # an existing folder (made by an earlier run) is used as it is
        from motiontune.testing.clips import write_mixed_dataset

        write_mixed_dataset(folder, n)
    inspect = [sys.executable, "-m", "motiontune", "inspect", str(folder), "--set", f"cache_dir={root / f'inspect-cache-{n}'}"]

    def load() -> float:
        return float(Path("/proc/loadavg").read_text().split()[0])

    def survey() -> dict:  # in-process time of the survey (CPU: with the probing workers)
        result = child("survey", root, n)
        return {"wall": result["seconds"], "cpu": result["cpu_seconds"]}

    kinds = {"`inspect` process": (lambda: measured(inspect), root / f"inspect-cache-{n}"),
             "survey in train": (survey, root / f"cache-{n}")}
    runs = []
    for _ in range(repeats):
        run = {}
        for kind, (measure, cache) in kinds.items():
            shutil.rmtree(cache, ignore_errors=True)  # first: no probes kept
            for when in ("first", "again"):
                before = load()
                run[kind, when] = {"load": before, **{k: v for k, v in measure().items() if k in ("wall", "cpu")}}
        runs.append(run)
        print(" | ".join(f"{kind} {when}: load {r['load']:.2f}, {r['wall']:.3f} s, CPU {r['cpu']:.3f} s"
                         for (kind, when), r in run.items()), flush=True)
    lines = ["| figure | " + " | ".join(f"rep {i + 1}" for i in range(repeats)) + " | median |",
             "| --- | " + " | ".join("---" for _ in range(repeats + 1)) + " |"]

    def row(label: str, values: list[float]) -> None:
        lines.append(f"| {label} | " + " | ".join(f"{v:.3g}" for v in values) + f" | {statistics.median(values):.3g} |")

    for kind in kinds:
        for when in ("first", "again"):
            row(f"load average before {kind}, {when}", [r[kind, when]["load"] for r in runs])
            row(f"{kind}, {when} (s)", [r[kind, when]["wall"] for r in runs])
            row(f"{kind}, {when}, CPU{' with the probing workers' if when == 'first' else ''} (s)",
                [r[kind, when]["cpu"] for r in runs])
        for figure in ("wall", "cpu"):
            row(f"{kind}, first / again, {'CPU' if figure == 'cpu' else 'wall'}",
                [r[kind, "first"][figure] / r[kind, "again"][figure] for r in runs])
    return "\n".join(lines)


def exponent(ns: list[int], values: list[float]) -> float:
    """Least-squares slope of log(value) against log(N)."""
    if len(ns) < 2:
        return float("nan")
    xs, ys = [math.log(n) for n in ns], [math.log(max(v, 1e-9)) for v in values]
    mx, my = statistics.mean(xs), statistics.mean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


FIGURES = [  # (label, how to read it from a row)
    ("inspect, first (s)", lambda r: r["inspect_cold"]["wall"]),
    ("inspect, first, CPU (s)", lambda r: r["inspect_cold"]["cpu"]),
    ("inspect, again (s)", lambda r: r["inspect_warm"]["wall"]),
    ("inspect, again, CPU (s)", lambda r: r["inspect_warm"]["cpu"]),
    ("inspect, first / again, CPU", lambda r: r["inspect_cold"]["cpu"] / r["inspect_warm"]["cpu"]),
    ("inspect peak RSS (MB)", lambda r: r["inspect_cold"]["rss_mb"]),
    ("survey in train, first (s)", lambda r: r["survey_cold"]["seconds"]),
    ("survey in train, again (s)", lambda r: r["survey_warm"]["seconds"]),
    ("survey, first / again", lambda r: r["survey_cold"]["seconds"] / r["survey_warm"]["seconds"]),
    ("survey in train, first, CPU (s)", lambda r: r["survey_cold"].get("cpu_seconds", math.nan)),
    ("cache fill (clips/s)", lambda r: r["fill"]["clips"] / r["fill"]["fill"]),
    ("decoder alone (clips/s)", lambda r: r["fill"]["clips"] / r["fill"]["decode"]),
    ("VAE alone (clips/s)", lambda r: r["fill"]["clips"] / r["fill"]["encode"]),
    ("cache fill time (s)", lambda r: r["fill"]["fill"]),
    ("cache fill, CPU (s)", lambda r: r["fill"].get("fill_cpu", math.nan)),
    ("caption embeddings, fill (s)", lambda r: r["fill"]["texts"]),
    ("decoder alone, CPU (s)", lambda r: r["fill"].get("decode_cpu", math.nan)),
    ("step overhead, cached (ms)", lambda r: r["steps"]["per_step_ms"]),
    ("cache size (MB)", lambda r: r["fill"]["cache_mb"]),
    ("cache files", lambda r: r["fill"]["cache_files"]),
    ("peak RSS of the fill (MB)", lambda r: r["fill"]["rss_mb"]),
    ("train 6 steps, process (s)", lambda r: r["train"]["wall"]),
    ("train 6 steps, process CPU (s)", lambda r: r["train"]["cpu"]),
    ("--resume mid-epoch, process (s)", lambda r: r["resume"]["wall"]),
    ("--resume mid-epoch, process CPU (s)", lambda r: r["resume"]["cpu"]),
    ("peak RSS of training (MB)", lambda r: r["train"]["rss_mb"]),
    ("peak RSS of resumed training (MB)", lambda r: r["resume"]["rss_mb"]),
]


def table(rows: list[dict]) -> str:
    ns = [r["n"] for r in rows]
    lines = ["| figure | " + " | ".join(f"N = {n:,}" for n in ns) + " | exponent |",
             "| --- | " + " | ".join("---" for _ in ns) + " | --- |"]
    for label, read in FIGURES:
        values = [read(r) for r in rows]
        shown = [f"{v:,.0f}" if v >= 100 else f"{v:.3g}" for v in values]
        known = [(n, v) for n, v in zip(ns, values) if not math.isnan(v)]
        lines.append(f"| {label} | " + " | ".join(shown) + f" | {exponent(*zip(*known)) if known else math.nan:.2f} |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        mode, root, n, *rest = sys.argv[2:]
        print(json.dumps(CHILDREN[mode](Path(root), int(n), *map(int, rest))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--root", type=Path, default=ROOT_DEFAULT)
    parser.add_argument("--table", action="store_true", help="only print the table of the results kept in --root")
    parser.add_argument("--again", type=int, metavar="N", help="only the second survey of an unchanged folder of N "
                        "files against the first (inspect and the survey in train), --repeats times in turn")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    args.root.mkdir(parents=True, exist_ok=True)
    if args.again:
        print(run_again(args.root, args.again, args.repeats))
        return
    kept = args.root / "results.json"  # rows of earlier runs are kept, so sizes can be measured in turns
    rows = {r["n"]: r for r in json.loads(kept.read_text())} if kept.is_file() else {}
    for n in [] if args.table else args.sizes:
        started = time.perf_counter()
        rows[n] = run_size(args.root, n)
        kept.write_text(json.dumps([rows[k] for k in sorted(rows)], indent=1))
        print(f"N = {n}: {rows[n]['kinds']}, measured in {time.perf_counter() - started:.0f} s", flush=True)
    print(table([rows[k] for k in sorted(rows)]))


if __name__ == "__main__":
    main()
