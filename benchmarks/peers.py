"""motiontune beside its peers: the same WAN 2.1 T2V LoRA job trained by motiontune, musubi-tuner, finetrainers and
diffusion-pipe, each in its own processes, from the same raw clips and the same random weights.

Set-up first (each peer in its own virtualenv outside the repo, CPU torch): `bash benchmarks/peers_setup.sh`. Then

    PYTHONPATH=. .venv/bin/python benchmarks/peers.py                      # the issue's job, every peer set up
    PYTHONPATH=. .venv/bin/python benchmarks/peers.py --epochs 2 --frames 9 --resolution 64   # a quick try-out

(`--width tiny` is for motiontune and finetrainers only: musubi-tuner takes the width from its task, t2v-1.3B.)

The job: WAN 2.1 T2V at 1.3B width (dim 1536, 12 heads, ffn 8960; --layers blocks, 2 by default), random weights
written once in each tool's layout (a diffusers folder for motiontune and finetrainers; original WAN single files
for musubi-tuner and diffusion-pipe: the DiT, the UMT5 encoder, the WAN 2.1 VAE); the same 3 clips from
shared/videos at 17 frames x 256², LoRA rank 16 (alpha 16) on every attention projection and feed-forward layer of
every block, batch 1, AdamW at 1e-4, bf16 autocast (or bf16 weights where a tool has no autocast), gradient
checkpointing, 3 x --epochs steps. The text encoder is a one-layer UMT5 of the real width (4096) and a tiny
vocabulary, the VAE the real WAN 2.1 architecture: both random.

motiontune runs twice: `motiontune` is one `train` process (it encodes what the cache lacks, releases the encoders,
then trains); `motiontune-cache-first` runs `motiontune cache` and then `motiontune train`, two processes as
musubi-tuner runs, so its training process never holds the VAE or the text encoder.

Figures per tool:
- wall: from the raw clips to the finished LoRA file, every process the tool needs (caching, training) included;
- step: the median time between optimizer steps once every clip is cached (steps after the first epoch);
- peak RSS: the training process's own maximum resident set (VmHWM, which _peer_probe.py reads in that process at
  its end). Not wait4's rusage: that is the largest of the process and every descendant it waited for
  (motiontune's encoding child, musubi-tuner's data-loader workers), and the kernel starts it from the launching
  process's own peak (ru_maxrss carries over exec, and Python's subprocess execs from a vfork sharing this script's
  memory map), so a small process read as large as this script at its peak. motiontune's encoding child is shown
  apart, from the peak it reports itself (the run's result.json);
- step peak: the most the training steps' resident memory rose above the process's resident memory just before
  the first training forward (model, adapter and optimizer loaded): activations, gradients, optimizer state.
A phase's figure ("peak" in the per-phase lines) is the training process's own peak for a training phase, and for
the others (caching) the largest process of the phase, from wait4 in a small launcher (_LAUNCHER) so that this
script's own peak is not its floor.
Step times and memory come from benchmarks/_peer_probe.py, which runs each trainer's own entry point in its process
and hooks torch's optimizer step; nothing in the trainers is changed for it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PROBE = HERE / "_peer_probe.py"
VIDEOS = REPO.parent / "shared" / "videos"
# three clips of different shape and codec; captions use words the tiny tokenizer knows
CLIPS = {
    "shapes_200px_30fps.mp4": "moving shapes circle square triangle",
    "chaplin.mp4": "old silent comedy film a man walks",
    "big_buck_bunny_432_433.webm": "cartoon animation rabbit in a forest",
}
WIDTHS = {  # heads, head_dim, ffn
    "1.3B": (12, 128, 8960),
    "tiny": (2, 32, 256),  # for trying the script out
}
TEXT_DIM = 4096  # WAN's text_dim: the UMT5-XXL width, fixed in the original layout
# motiontune runs twice: one `train` (encoding what is not cached, then training), and `cache` then `train` in two
# processes, as musubi-tuner runs (its training process never holds an encoder)
TOOLS = ["motiontune", "motiontune-cache-first", "musubi-tuner", "finetrainers", "diffusion-pipe"]


@dataclass
class Phase:
    name: str
    seconds: float
    peak_rss: int | None  # bytes: the training process's own (probe) for a training phase, else the largest process's
    returncode: int
    own: bool = False  # peak_rss is the process's own, read by the probe inside it


@dataclass
class Result:
    tool: str
    phases: list[Phase] = field(default_factory=list)
    wall: float = 0.0
    step: float | None = None
    steps: int = 0
    train_peak_rss: int | None = None  # the training process's own peak (the probe's VmHWM)
    child_peak_rss: int | None = None  # motiontune: the encoding child's own peak, as it reported it
    step_peak: int | None = None
    error: str | None = None
    lora: Path | None = None


# ---------------------------------------------------------------------------------------------------- the model


def build_models(work: Path, args, peers: Path) -> dict[str, Path]:
    """Random weights once: a diffusers folder plus the same weights in the original WAN layout."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

    from motiontune.models.wan import original_name
    from motiontune.testing.tiny_models import build_tokenizer

    heads, head_dim, ffn = WIDTHS[args.width]
    diffusers_dir, original = work / "model-diffusers", work / "model-original"
    paths = {"diffusers": diffusers_dir, "dit": original / "wan2.1_t2v_dit.safetensors",
             "t5": original / "umt5_encoder.safetensors", "vae": original / "wan_2.1_vae.safetensors",
             "tokenizer": diffusers_dir / "tokenizer"}
    if (work / "models.done").exists():
        return paths
    original.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    # The VAE: the real WAN 2.1 architecture, random, written in the original layout by the original-layout
    # class in a peer's venv, then read into diffusers with diffusers' own converter (so both hold the same weights).
    vae_script = (
        "import sys, torch; from safetensors.torch import save_file\n"
        "from musubi_tuner.wan.modules.vae import WanVAE_\n"
        "torch.manual_seed(0)\n"
        "m = WanVAE_(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],"
        " temperal_downsample=[False, True, True], dropout=0.0)\n"
        "save_file({k: v.contiguous() for k, v in m.state_dict().items()}, sys.argv[1])\n"
    )
    musubi_python = peers / "venv-musubi-tuner" / "bin" / "python"
    if musubi_python.exists():
        subprocess.run([str(musubi_python), "-c", vae_script, str(paths["vae"])], check=True)
        config_dir = work / "vae-config"
        AutoencoderKLWan().save_config(config_dir)  # the default config is WAN 2.1's VAE
        vae = AutoencoderKLWan.from_single_file(str(paths["vae"]), config=str(config_dir))
    else:
        print("  (musubi-tuner not set up: the VAE exists in the diffusers layout only)")
        vae = AutoencoderKLWan()

    build_tokenizer(diffusers_dir / "tokenizer")
    # one UMT5 layer of the real width; the original layout (Wan's T5Encoder) has no separate head size, so the
    # relative-position settings are the original's (32 buckets, distance 128)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=256, d_model=TEXT_DIM, d_kv=64, d_ff=256, num_layers=1, num_heads=2,
        relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
    )).to(torch.bfloat16)
    transformer = WanTransformer3DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, ffn_dim=ffn, num_layers=args.layers,
        text_dim=TEXT_DIM, freq_dim=256, in_channels=16, out_channels=16,
    ).to(torch.bfloat16)
    WanPipeline(
        tokenizer=AutoTokenizer.from_pretrained(diffusers_dir / "tokenizer"), text_encoder=text_encoder, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=transformer,
    ).save_pretrained(diffusers_dir)
    portable_tokenizer(diffusers_dir / "tokenizer")  # after save_pretrained, which writes the tokenizer again

    save_file({original_name(k): v.contiguous() for k, v in transformer.state_dict().items()}, str(paths["dit"]))
    save_file(original_t5(text_encoder.state_dict()), str(paths["t5"]))
    (work / "t5-config.json").write_text(json.dumps(t5_config(text_encoder.config)))
    (work / "models.done").touch()
    return paths


def portable_tokenizer(folder: Path) -> None:
    """transformers 5 names its fast tokenizer class TokenizersBackend, which the peers' transformers 4 do not
    know; PreTrainedTokenizerFast reads the same tokenizer.json in both."""
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2))


def original_t5(state: dict) -> dict:
    """transformers' UMT5 encoder names -> the original Wan T5Encoder names (models_t5_umt5-xxl-enc-bf16.pth)."""
    names = {"encoder.embed_tokens.weight": None, "shared.weight": "token_embedding.weight",
             "encoder.final_layer_norm.weight": "norm.weight"}
    block = {"layer.0.layer_norm.weight": "norm1.weight", "layer.1.layer_norm.weight": "norm2.weight",
             "layer.0.SelfAttention.q.weight": "attn.q.weight", "layer.0.SelfAttention.k.weight": "attn.k.weight",
             "layer.0.SelfAttention.v.weight": "attn.v.weight", "layer.0.SelfAttention.o.weight": "attn.o.weight",
             "layer.0.SelfAttention.relative_attention_bias.weight": "pos_embedding.embedding.weight",
             "layer.1.DenseReluDense.wi_0.weight": "ffn.gate.0.weight",
             "layer.1.DenseReluDense.wi_1.weight": "ffn.fc1.weight", "layer.1.DenseReluDense.wo.weight": "ffn.fc2.weight"}
    out = {}
    for key, value in state.items():
        if key in names:
            if names[key]:
                out[names[key]] = value.contiguous()
            continue
        _, _, index, rest = key.split(".", 3)  # encoder.block.<i>.<rest>
        out[f"blocks.{index}.{block[rest]}"] = value.contiguous()
    return out


def t5_config(config) -> dict:
    """The original-layout T5 constructor's arguments for this encoder (the peers' umt5_xxl() keyword names)."""
    return {"vocab_size": config.vocab_size, "dim": config.d_model, "dim_attn": config.num_heads * config.d_kv,
            "dim_ffn": config.d_ff, "num_heads": config.num_heads, "encoder_layers": config.num_layers,
            "num_buckets": config.relative_attention_num_buckets}


def write_clips(folder: Path) -> Path:
    """The raw clips, each beside its caption (.txt), as every tool here reads a folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, caption in CLIPS.items():
        if not (folder / name).exists():
            shutil.copy(VIDEOS / name, folder / name)
        (folder / name).with_suffix(".txt").write_text(caption)
    return folder


# ---------------------------------------------------------------------------------------------------- running


# Runs the command and writes its wait4 ru_maxrss (bytes) to argv[1]: started from this small process, the figure's
# floor is the launcher's few MB rather than this script's peak (ru_maxrss carries over exec)
_LAUNCHER = ("import os, subprocess, sys\n"
             "process = subprocess.Popen(sys.argv[2:])\n"
             "_, status, usage = os.wait4(process.pid, 0)\n"
             "open(sys.argv[1], 'w').write(str(usage.ru_maxrss * 1024))\n"
             "sys.exit(os.waitstatus_to_exitcode(status))\n")


def run_phase(result: Result, name: str, command: list[str], cwd: Path, env: dict, log: Path,
              probe: Path | None = None) -> bool:
    """One process of a tool; its time and peak RSS. `probe`: the command runs under _peer_probe.py writing there,
    and the peak is the process's own (VmHWM, its children apart); otherwise the largest process of the phase."""
    print(f"  {result.tool}: {name} ...", flush=True)
    tree = log.with_name(f"{log.stem}.{len(result.phases)}.maxrss")
    if probe is not None:
        probe.unlink(missing_ok=True)
        command = [command[0], PROBE, probe, *command[1:]]
    with open(log, "a") as out:
        out.write(f"\n$ (cd {cwd}) {' '.join(map(str, command))}\n")
        out.flush()
        start = time.perf_counter()
        process = subprocess.run([sys.executable, "-c", _LAUNCHER, str(tree), *map(str, command)], cwd=cwd, env=env,
                                 stdout=out, stderr=subprocess.STDOUT)
        seconds = time.perf_counter() - start
    measured = json.loads(probe.read_text()) if probe is not None and probe.is_file() else {}
    own = measured.get("peak_rss")
    largest = int(tree.read_text()) if tree.is_file() else None
    phase = Phase(name, seconds, own if own is not None else largest, process.returncode, own=own is not None)
    result.phases.append(phase)
    if process.returncode != 0:
        tail = log.read_text().strip().splitlines()[-15:]
        result.error = f"{name} exited {process.returncode}; last lines of {log}:\n      " + "\n      ".join(tail)
        return False
    return True


def read_probe(result: Result, probe: Path, clips: int) -> None:
    probe = json.loads(probe.read_text())
    result.train_peak_rss = probe.get("peak_rss")  # the training process's own, its children apart
    steps = probe["steps"]
    result.steps = len(steps)
    # steps after the first epoch read every latent and embedding from the cache
    cached = [(steps[k - 1], steps[k]) for k in range(max(clips, 1), len(steps))]
    if cached:
        result.step = statistics.median(b[0] - a[0] for a, b in cached)
    if steps and probe["loaded"]:
        result.step_peak = max(s[2] for s in steps) - probe["loaded"]


def base_env(args) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    threads = str(args.threads)
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    return env


def run_motiontune(result: Result, ctx, cache_first: bool = False) -> None:
    work = ctx.work / result.tool
    config = {
        "model_type": "WAN_2_1_T2V", "base_model_name": str(ctx.paths["diffusers"]),
        "concepts": [{"path": str(ctx.clips)}], "resolution": str(ctx.args.resolution), "epochs": ctx.args.epochs,
        "batch_size": 1, "learning_rate": 1e-4, "train_dtype": "BFLOAT_16", "gradient_checkpointing": "ON",
        "vae": {"weight_dtype": "BFLOAT_16"},  # the peers encode in bf16 too (musubi-tuner's default, finetrainers' flag)
        "lora_rank": ctx.args.rank, "lora_alpha": ctx.args.rank, "optimizer": {"optimizer": "ADAMW"},
        "workspace_dir": str(work / "workspace"), "cache_dir": str(work / "cache"),
        "output_model_destination": str(work / "lora.safetensors"), "sample_after_unit": "NEVER",
        "video_config": {"max_frames": ctx.args.frames, "target_fps": 16.0},
    }
    (work / "config.json").write_text(json.dumps(config, indent=1))
    env = base_env(ctx.args) | {"PYTHONPATH": str(REPO)}
    sets = [arg for setting in ctx.args.motiontune_set for arg in ("--set", setting)]
    if cache_first and not run_phase(result, "cache", [sys.executable, "-m", "motiontune", "cache", "--config",
                                                        work / "config.json", *sets], REPO, env, work / "log.txt"):
        return
    if run_phase(result, "train" if cache_first else "train (encodes, then trains)",
                 [sys.executable, "-m", "motiontune", "train", "--config", work / "config.json", *sets],
                 REPO, env, work / "log.txt", probe=work / "probe.json"):
        read_probe(result, work / "probe.json", len(CLIPS))
        read_motiontune_result(result, work / "workspace" / "result.json")
        result.lora = work / "lora.safetensors"


def read_motiontune_result(result: Result, path: Path) -> None:
    """The encoding child's own peak, as `train` records it (None when everything was cached)."""
    peaks = json.loads(path.read_text()).get("peak_rss") or {}
    result.child_peak_rss = peaks.get("encoding_process")


def run_musubi(result: Result, ctx) -> None:
    work, root = ctx.work / "musubi-tuner", ctx.peers / "musubi-tuner"
    python = ctx.peers / "venv-musubi-tuner" / "bin" / "python"
    (work / "dataset.toml").write_text(
        f'[general]\nresolution = [{ctx.args.resolution}, {ctx.args.resolution}]\ncaption_extension = ".txt"\n'
        f"batch_size = 1\nenable_bucket = true\nbucket_no_upscale = false\n\n"
        f'[[datasets]]\nvideo_directory = "{ctx.clips}"\ncache_directory = "{work / "cache"}"\n'
        f'target_frames = [{ctx.args.frames}]\nframe_extraction = "head"\n'
    )
    # the local patches (peers_setup.sh) read the tiny text encoder's shape, its tokenizer and the block count here
    env = base_env(ctx.args) | {
        "MUSUBI_T5_CONFIG": (ctx.work / "t5-config.json").read_text(),
        "MUSUBI_T5_TOKENIZER": str(ctx.paths["tokenizer"]), "MUSUBI_WAN_NUM_LAYERS": str(ctx.args.layers)}
    src, log, toml = root / "src" / "musubi_tuner", work / "log.txt", work / "dataset.toml"
    ok = run_phase(result, "cache latents", [python, src / "wan_cache_latents.py", "--dataset_config", toml,
                                             "--vae", ctx.paths["vae"], "--device", "cpu"], root, env, log)
    ok = ok and run_phase(result, "cache text", [python, src / "wan_cache_text_encoder_outputs.py", "--dataset_config",
                                                 toml, "--t5", ctx.paths["t5"], "--device", "cpu", "--batch_size", "16"],
                          root, env, log)
    steps = ctx.args.epochs * len(CLIPS)
    ok = ok and run_phase(result, "train", [
        python, src / "wan_train_network.py", "--task", "t2v-1.3B",
        "--dit", ctx.paths["dit"], "--dataset_config", toml, "--sdpa", "--mixed_precision", "bf16",
        "--optimizer_type", "AdamW", "--learning_rate", "1e-4", "--gradient_checkpointing",
        "--max_data_loader_n_workers", "2", "--network_module", "networks.lora_wan",
        "--network_dim", str(ctx.args.rank), "--network_alpha", str(ctx.args.rank),
        "--timestep_sampling", "sigmoid", "--max_train_steps", str(steps), "--seed", "42",
        "--output_dir", work / "output", "--output_name", "lora"], root, env, log, probe=work / "probe.json")
    if ok:
        read_probe(result, work / "probe.json", len(CLIPS))
        result.lora = work / "output" / "lora.safetensors"


def run_finetrainers(result: Result, ctx) -> None:
    work, root = ctx.work / "finetrainers", ctx.peers / "finetrainers"
    python = ctx.peers / "venv-finetrainers" / "bin" / "python"
    a = ctx.args
    (work / "dataset.json").write_text(json.dumps({"datasets": [{
        "data_root": str(ctx.clips), "dataset_type": "video",
        "video_resolution_buckets": [[a.frames, a.resolution, a.resolution]], "reshape_mode": "bicubic"}]}))
    steps = a.epochs * len(CLIPS)
    env = base_env(a)
    ok = run_phase(result, "precompute + train", [
        python, root / "train.py",
        "--parallel_backend", "accelerate", "--pp_degree", "1", "--dp_degree", "1", "--dp_shards", "1",
        "--cp_degree", "1", "--tp_degree", "1",
        "--model_name", "wan", "--pretrained_model_name_or_path", ctx.paths["diffusers"],
        "--dataset_config", work / "dataset.json", "--dataset_shuffle_buffer_size", "1",
        "--enable_precomputation", "--precomputation_items", str(len(CLIPS)), "--precomputation_once",
        "--dataloader_num_workers", "0", "--flow_weighting_scheme", "logit_normal",
        "--training_type", "lora", "--seed", "42", "--batch_size", "1", "--train_steps", str(steps),
        "--rank", str(a.rank), "--lora_alpha", str(a.rank),
        "--target_modules", r"blocks.*(to_q|to_k|to_v|to_out.0|ffn.net.0.proj|ffn.net.2)",
        "--gradient_accumulation_steps", "1", "--gradient_checkpointing", "--checkpointing_steps", str(10 ** 6),
        "--transformer_dtype", "bf16", "--text_encoder_dtype", "bf16", "--vae_dtype", "bf16",
        "--optimizer", "adamw", "--lr", "1e-4", "--lr_scheduler", "constant", "--max_grad_norm", "1.0",
        "--output_dir", work / "output", "--report_to", "none"], root, env, work / "log.txt", probe=work / "probe.json")
    if ok:
        read_probe(result, work / "probe.json", len(CLIPS))
        result.lora = next(iter(sorted((work / "output").rglob("*.safetensors"))), None)


RUNNERS = {"motiontune": run_motiontune, "motiontune-cache-first": lambda r, c: run_motiontune(r, c, cache_first=True),
           "musubi-tuner": run_musubi, "finetrainers": run_finetrainers}
# diffusion-pipe is CUDA-only from its first import on (benchmarks/RESULTS.md lists the lines); no runner
NOT_ON_CPU = {"diffusion-pipe": "CUDA only: models/base.py:12 `import torchaudio` (a CUDA build on PyPI), "
                                "models/wan/t5.py:547 `device=torch.cuda.current_device()`, train.py:299 "
                                "`torch.cuda.set_device`, `.to('cuda')` through models/wan/wan.py (RESULTS.md)"}


# ---------------------------------------------------------------------------------------------------- report


def mb(n: int | None) -> str:
    return "–" if n is None else f"{n / 2 ** 20:.0f} MB"


def table(results: list[Result]) -> str:
    ours = [r for r in results if r.tool.startswith("motiontune") and not r.error]

    def ratio(get, mine, r):
        a, b = get(mine), get(r)
        return f"{a / b:.2f}" if a and b else "–"

    rows = ["| tool | wall, raw clips → LoRA | cached step (median) | peak RSS (training process's own) | encoding "
            "child's peak | step peak over loaded model | steps |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        if r.error:
            rows.append(f"| {r.tool} | did not run: {r.error.splitlines()[0]} | | | | | |")
            continue
        step = f"{r.step:.2f} s" if r.step is not None else "–"
        rows.append(f"| {r.tool} | {r.wall:.1f} s | {step} | {mb(r.train_peak_rss)} | {mb(r.child_peak_rss)} | "
                    f"{mb(r.step_peak) if r.step is not None else '–'} | {r.steps} |")
    rows += ["", "| motiontune / peer | wall | cached step | peak RSS | step peak |", "| --- | --- | --- | --- | --- |"]
    for mine in ours:
        for r in results:
            if not r.tool.startswith("motiontune") and not r.error:
                rows.append(f"| {mine.tool} / {r.tool} | {ratio(lambda x: x.wall, mine, r)} | "
                            f"{ratio(lambda x: x.step, mine, r)} | {ratio(lambda x: x.train_peak_rss, mine, r)} | "
                            f"{ratio(lambda x: x.step_peak, mine, r)} |")
    return "\n".join(rows)


def git_commit() -> str:
    done = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=10", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip()


@dataclass
class Context:
    args: argparse.Namespace
    work: Path
    peers: Path
    paths: dict
    clips: Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tools", nargs="+", default=TOOLS, choices=TOOLS)
    parser.add_argument("--epochs", type=int, default=4, help="steps = 3 clips x epochs (default 4: 12 steps)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", default="1.3B", choices=list(WIDTHS), help="tiny: not for musubi-tuner")
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--motiontune-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config key for motiontune's run, as `motiontune train --set` takes it (e.g. compile=true)")
    parser.add_argument("--peers", type=Path, default=os.environ.get("PEERS"),
                        help="the folder benchmarks/peers_setup.sh installed the peers into (default: $PEERS)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "motiontune-peers",
                        help="scratch folder (models are reused across runs with the same sizes)")
    args = parser.parse_args()
    if args.peers is None:
        parser.error("name the folder the peers were set up in: --peers DIR or PEERS=DIR (see benchmarks/peers_setup.sh)")

    work = args.work / f"{args.width}-L{args.layers}"
    models = build_models(work, args, args.peers)
    for tool in args.tools:  # each run starts from raw clips and empty caches
        shutil.rmtree(work / tool, ignore_errors=True)
        (work / tool).mkdir(parents=True)
    ctx = Context(args, work, args.peers, models, write_clips(work / "clips"))
    print(f"torch {torch.__version__}; {args.width} width, {args.layers} blocks, {args.frames} frames x "
          f"{args.resolution}², rank {args.rank}, {args.epochs * len(CLIPS)} steps; load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)

    results = []
    for tool in args.tools:
        result = Result(tool)
        commit = args.peers / tool / ".commit"
        if not tool.startswith("motiontune") and not (args.peers / f"venv-{tool}" / "bin" / "python").exists():
            result.error = f"not set up ({args.peers}/venv-{tool} missing: run benchmarks/peers_setup.sh)"
        elif tool in NOT_ON_CPU:
            result.error = f"does not run on a CPU: {NOT_ON_CPU[tool]}"
        else:
            start = time.perf_counter()
            RUNNERS[tool](result, ctx)
            result.wall = time.perf_counter() - start
            if result.phases and not result.error:
                if result.lora is None or not result.lora.exists():
                    result.error = "no LoRA file written"
        version = commit.read_text().strip()[:10] if commit.exists() else git_commit()
        print(f"  {tool} {version}: " + ("; ".join(f"{p.name} {p.seconds:.1f} s, peak {mb(p.peak_rss)}"
                                                   + ("" if p.own else " (largest process)") for p in result.phases) or "-")
              + (f"; its encoding child's own peak {mb(result.child_peak_rss)}" if result.child_peak_rss else "")
              + (f"\n    ERROR {result.error}" if result.error else ""), flush=True)
        results.append(result)
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(table(results))


if __name__ == "__main__":
    main()
