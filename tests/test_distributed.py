"""torchrun with 2 CPU ranks (gloo) trains exactly what one process with the combined batch trains."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import DATA, base_config, write_config
from test_reliability import losses


def make_config(tmp_path: Path, name: str, model: Path, dataset: Path, **keys) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    # two buckets (the clips differ in length) of 3 repeats each: global batches of 2 (a row per rank) and
    # of 1 (rank 1 idle), so both even and uneven splits are trained; 2 epochs of 4 steps, so a run continued from its
    # first backup (step 2) crosses an epoch
    keys = {"epochs": 2, "learning_rate": 3e-3, "backup_after": 2, "backup_after_unit": "STEP",
            "concepts": [{"path": str(dataset), "repeats": 3}],
            "video_config": {"max_frames": 9, "target_fps": 8.0, "video_batch_size_multiplier": 1.0}, **keys}
    # each run fills its own cache, so the 2-rank runs split the encoding between them
    config = base_config(folder, model, dataset, **{"cache_dir": str(folder / "cache"), **keys})
    return write_config(folder / "config.json", **config)


def run(config: Path, ranks: int, *extra: str) -> subprocess.CompletedProcess | None:
    """`ranks` > 1: a torchrun launch, as users start one. 1: the reference run, in this process (an interpreter
    start and the imports fewer; the launches above show that a run's errors reach the user)."""
    if ranks == 1:
        from motiontune.cli import main

        assert main(["train", "--config", str(config), *extra]) == 0
        return None
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    done = subprocess.run([*launcher, "-m", "motiontune", "train", "--config", str(config), *extra],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def saved(path: Path) -> dict[str, torch.Tensor]:
    if path.is_dir():  # a diffusers transformer folder, or a transformers text encoder one
        name = "model.safetensors" if (path / "model.safetensors").is_file() else "diffusion_pytorch_model.safetensors"
        return load_file(str(path / name))
    return load_file(str(path))


def clips(folder: Path) -> Path:
    """The `dataset` fixture's two captioned clips, for a run shared by several tests (the fixture is per test)."""
    folder.mkdir()
    for name, caption in (("shapes_200px_30fps.mp4", "moving shapes"), ("big_buck_bunny_432_433.webm", "a rabbit")):
        (folder / name).write_bytes((DATA / name).read_bytes())
        (folder / name).with_suffix(".txt").write_text(caption + "\n")
    return folder


def method_keys(method: str, dataset: Path) -> dict:
    # LORA: each process encodes in a child of its own (encode_in_child, the users' default), each rank's its share
    keys = {"training_method": method.split("+")[0], "encode_in_child": method == "LORA"}
    if method.startswith("FINE_TUNE"):
        keys.update(learning_rate=1e-3, output_model_format="DIFFUSERS")
    if method == "EMBEDDING":  # replicated like a LoRA; the captions hold the placeholder
        for caption in dataset.glob("*.txt"):
            caption.write_text(caption.read_text().strip() + " <shapes>\n")
        keys.update(output_model_format="SAFETENSORS", embedding_learning_rate=0.1,
                    embedding={"placeholder": "<shapes>", "token_count": 2, "initial_embedding_text": "shapes"})
    if method.endswith("text_encoder"):  # replicated beside the sharded transformer: its gradients are summed
        keys.update(text_encoder={"train": True, "learning_rate": 1e-3})
    return keys


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory, tiny_models):
    """method → (folder, clips, keys, torchrun's output) of one 2-rank run (batch_size 1 a rank, 2 epochs, a backup
    every 2 steps), made once: the equivalence test compares it with one process, the resume test continues its
    first backup (the tests of a method share an xdist group, so one worker makes it)."""
    made = {}

    def get(method: str):
        if method not in made:
            root = tmp_path_factory.mktemp(f"two-ranks-{method}")
            data = clips(root / "clips")
            keys = method_keys(method, data)
            made[method] = (root, data, keys, run(make_config(root, "double", tiny_models("wan-2.1"), data, batch_size=1, **keys), 2))
        return made[method]

    return get


# FINE_TUNE alone is not run apart: FINE_TUNE+text_encoder trains and compares the same sharded transformer (its saved
# folder against one process's, its losses, its backups, its resume), the replicated text encoder beside it
SHARED = [pytest.param(m, marks=pytest.mark.xdist_group(f"two-ranks-{m}")) for m in ("LORA", "EMBEDDING", "FINE_TUNE+text_encoder")]


def assert_same_weights(a: dict, b: dict, tolerance: float, start: dict | None = None) -> float:
    """The largest difference, relative to how far training moved the weights from `start` (LoRA B: from 0).
    Batched and per-rank forwards round differently and Adam magnifies that a little; a wrong gradient
    weighting moves weights by a sizeable part of a step (checked: halving rank 1's share gives 0.1 for the LoRA, 0.6 for the fine-tune)."""
    assert a.keys() == b.keys()
    start = start or {k: torch.zeros_like(v) for k, v in a.items()}
    moved = max((a[k].float() - start[k].float()).abs().max().item() for k in a)
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a) / moved
    assert worst <= tolerance, f"weights differ by up to {worst:.2e} of how far they moved"
    return worst


@pytest.mark.parametrize("method", SHARED)
def test_two_ranks_equal_one_process_with_the_combined_batch(tmp_path, tiny_models, two_rank_runs, method):
    model = tiny_models("wan-2.1")
    root, dataset, keys, output = two_rank_runs(method)
    # the reference encodes in this process: the 2-rank run shows the encoding child (encode_in_child does not
    # change what trains, and the cache entries are the same)
    single = make_config(tmp_path, "single", model, dataset, batch_size=2, **{**keys, "encode_in_child": False})
    run(single, 1)

    one, two = json.loads((tmp_path / "single/workspace/result.json").read_text()), json.loads((root / "double/workspace/result.json").read_text())
    assert one["steps"] == two["steps"] > 1
    single_out, double_out = Path(one["loras"][0]), Path(two["loras"][0])
    base = saved(single_out)
    start = saved(model / "transformer") if method.startswith("FINE_TUNE") else None  # LoRA B and embeddings: vs 0
    worst = assert_same_weights(base, saved(double_out), tolerance=1e-2, start=start)
    print(f"{method}: {one['steps']} steps, largest weight difference 2 ranks vs 1 process: {worst:.1e} of the change")
    if method.endswith("text_encoder"):  # the replicated text encoder trained alike too
        assert [Path(p).name for p in one["loras"]] == ["lora.safetensors", "lora.safetensors_text_encoder"]
        worst = assert_same_weights(saved(Path(one["loras"][1])), saved(Path(two["loras"][1])), tolerance=1e-2,
                                    start=saved(model / "text_encoder"))
        print(f"{method}: text encoder within {worst:.1e} of the change")
    # the run trained something: a difference of zero would also hold for two untrained models
    if method == "LORA":
        assert max(v.abs().max().item() for k, v in base.items() if "lora_B" in k) > 1e-3
    # the losses each step are the global batch's, equal to the single process's
    single_losses, double_losses = losses(tmp_path / "single/workspace"), losses(root / "double/workspace")
    assert single_losses.keys() == double_losses.keys()
    assert all(abs(single_losses[s] - double_losses[s]) < 1e-5 for s in single_losses)
    # rank 0 encoded only its share of the clips (in its child, with LORA); the cache holds them all
    assert 0 < two["encoder_calls"]["video"] < one["encoder_calls"]["video"]
    if method == "LORA":
        assert "encoding this rank's share of the missing clips and texts in a separate process" in output.stderr
    # only rank 0 wrote backups, logs and outputs; the log says how the ranks split the work
    assert "2 processes (gloo)" in output.stderr
    assert len(list((root / "double/workspace/backup").glob("step-*"))) >= 1


# FINE_TUNE+text_encoder only: its backup holds the sharded transformer's state (gathered to rank 0, broadcast back)
# and the replicated text encoder's, which every rank restores whole as it would a LoRA, and each rank's random
# state; LoRA adapters' backups are resumed in one process in test_reliability
@pytest.mark.parametrize("method", [SHARED[2]])
def test_a_two_rank_run_resumes_from_its_backup_exactly(tmp_path, tiny_models, two_rank_runs, method, capsys):
    """The shared 2-rank run, continued from its first backup (in the previous epoch) by a second 2-rank run in a
    workspace of its own, ends with the same weights bit for bit and the same losses each later step."""
    model = tiny_models("wan-2.1")
    root, dataset, keys, _ = two_rank_runs(method)
    straight = root / "double"
    backups = sorted((straight / "workspace/backup").glob("step-*"))
    middle = backups[0]
    assert json.loads((middle / "backup.json").read_text())["world_size"] == 2
    state = torch.load(middle / "state.pt", weights_only=True)
    assert len(state["rng_by_rank"]) == 2

    # the straight run's cache (cache_dir may change on resume): nothing to encode
    resumed = make_config(tmp_path, "resumed", model, dataset, batch_size=1, cache_dir=str(straight / "cache"), **keys)
    shutil.copytree(middle, tmp_path / "resumed/workspace/backup" / middle.name)
    run(resumed, 2, "--resume", "latest")
    one, two = (json.loads((folder / "workspace/result.json").read_text()) for folder in (straight, tmp_path / "resumed"))
    assert len(one["loras"]) == len(two["loras"]) == (2 if method.endswith("text_encoder") else 1)
    for a, b in zip(one["loras"], two["loras"]):  # the transformer (or LoRA), and the text encoder beside it
        base = model / ("text_encoder" if a.endswith("_text_encoder") else "transformer")
        assert_same_weights(saved(Path(a)), saved(Path(b)), tolerance=0.0, start=None if method == "LORA" else saved(base))
    later = {s: v for s, v in losses(straight / "workspace").items() if s > json.loads((middle / "backup.json").read_text())["step"]}
    resumed_losses = losses(tmp_path / "resumed/workspace")
    assert later and all(resumed_losses[s] == v for s, v in later.items())

    # one process cannot continue what two started: the global batch would change (in this process: the check runs
    # before anything slow, and torchrun's launches show errors reach the user)
    from motiontune.cli import main

    capsys.readouterr()
    assert main(["train", "--config", str(resumed), "--resume", str(middle)]) == 2
    refused = capsys.readouterr().err
    assert "written by 2 process(es) and this run has 1" in refused
    assert "--nproc-per-node 2" in refused


def test_more_ranks_than_clips_is_a_clear_error(tmp_path, tiny_models):
    folder = tmp_path / "one-clip"
    folder.mkdir()
    source = Path(__file__).parent / "data" / "big_buck_bunny_432_433.webm"
    (folder / source.name).write_bytes(source.read_bytes())
    config = make_config(tmp_path, "run", tiny_models("wan-2.1"), folder, batch_size=1, concepts=[{"path": str(folder)}])
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "motiontune",
                           "train", "--config", str(config)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0
    assert "2 processes but an epoch holds only 1 clip(s)" in done.stderr
    assert "--nproc-per-node" in done.stderr


def test_sample_backup_and_save_now_reach_a_two_rank_run(tmp_path, tiny_models, dataset):
    """`motiontune ui`'s Sample / Backup / Save now on a torchrun job: rank 0 takes each request, every rank runs
    it at the same step (a backup gathers every rank's random state), and it is answered once."""
    import time

    from motiontune.train.requests import answers, ask

    config = make_config(tmp_path, "asked", tiny_models("wan-2.1"), dataset, batch_size=1, epochs=12, backup_after_unit="NEVER",
                         samples=[{"prompt": "moving shapes", "frames": 5, "height": 32, "width": 32, "steps": 2}])
    workspace = tmp_path / "asked" / "workspace"
    job = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                            "motiontune", "train", "--config", str(config)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 300
        while not ((workspace / "progress.json").is_file() and json.loads((workspace / "progress.json").read_text())["step"] >= 1):
            assert job.poll() is None and time.time() < deadline, job.communicate()[1][-3000:] if job.poll() is not None else "no step"
            time.sleep(0.1)
        staged = tmp_path / "staged"  # asked all at once: one rename, so the run cannot take them at different steps
        for action in ("backup", "sample", "save"):
            ask(staged, action)
        (staged / "requests").rename(workspace / "requests")
        _, err = job.communicate(timeout=300)
    finally:
        job.kill()
    assert job.returncode == 0, err[-3000:]
    taken = answers(workspace)
    assert [a["action"] for a in taken] == ["backup", "sample", "save"], taken  # once each, in the order asked
    steps = {a["step"] for a in taken}
    assert len(steps) == 1 and 1 <= steps.pop() < json.loads((workspace / "result.json").read_text())["steps"]  # mid-run
    step = taken[0]["step"]
    [backup] = workspace.glob(f"backup/step-{step:07d}-*")
    assert len(torch.load(backup / "state.pt", weights_only=True)["rng_by_rank"]) == 2  # both ranks' states
    assert taken[0]["result"] == str(backup)
    assert (workspace / "samples" / f"step{step}-now-0.mp4").is_file() and taken[1]["result"] == "done"
    assert load_file(str(workspace / "save" / f"step{step}-now.safetensors"))  # a LoRA file, written once


def test_split_experts_train_what_one_process_trains(tmp_path, tiny_models, dataset):
    """`experts_on: split` on two ranks: rank 0 holds only the high-noise expert, rank 1 only the low-noise one; each
    trains the samples routed to it, and each saved LoRA equals the one a single process holding both trains from the
    same clips, noise levels and routing. The backup gathers both experts on rank 0."""
    keys = {"model_type": "WAN_2_2_T2V_A14B", "experts": "both"}
    model = tiny_models("wan-2.2-a14b")
    single = make_config(tmp_path, "single", model, dataset, batch_size=2, **keys)
    split = make_config(tmp_path, "split", model, dataset, batch_size=1, experts_on="split", **keys)
    run(single, 1)
    output = run(split, 2)

    one, two = (json.loads((tmp_path / name / "workspace/result.json").read_text()) for name in ("single", "split"))
    assert one["steps"] == two["steps"] > 1 and one["experts"] == two["experts"]
    counts = {name: part["samples"] for name, part in two["experts"].items()}
    assert min(counts.values()) > 0, counts  # both experts got samples, so both groups trained
    for label in ("high_noise", "low_noise"):
        a, b = saved(tmp_path / f"single/lora_{label}.safetensors"), saved(tmp_path / f"split/lora_{label}.safetensors")
        worst = assert_same_weights(a, b, tolerance=1e-5)
        assert max(v.abs().max().item() for k, v in b.items() if "lora_B" in k) > 1e-3  # it trained
        print(f"split experts, {label}: largest difference {worst:.1e} of the weights")
    assert sorted(Path(p).name for p in two["loras"]) == ["lora_high_noise.safetensors", "lora_low_noise.safetensors"]
    single_losses, split_losses = losses(tmp_path / "single/workspace"), losses(tmp_path / "split/workspace")
    assert all(abs(single_losses[s] - split_losses[s]) <= 1e-5 * abs(single_losses[s]) for s in single_losses)
    # the log says which ranks hold which expert and the share of the clips each trained
    assert "ranks 0 train the high-noise expert (transformer)" in output.stderr
    assert "ranks 1 train the low-noise expert (transformer_2)" in output.stderr
    total = sum(counts.values())
    assert f"ranks 1 trained the low-noise expert on {counts['low_noise']} of {total} clips" in output.stderr
    # rank 0's backup holds both experts' adapters (the low-noise one sent by rank 1), as the single run's does
    [backup] = sorted((tmp_path / "split/workspace/backup").glob("step-0000002-*"))
    [reference] = sorted((tmp_path / "single/workspace/backup").glob("step-0000002-*"))
    for name in ("transformer", "transformer_2"):
        assert_same_weights(load_file(str(reference / f"adapters-{name}.safetensors")),
                            load_file(str(backup / f"adapters-{name}.safetensors")), tolerance=1e-5)


def test_context_parallel_trains_what_one_process_trains(tmp_path, tiny_models, dataset):
    """`context_parallel` degree 2 (Ulysses attention over gloo): two ranks share each clip's tokens and train what one
    process trains; the same loss each step and the same LoRA. SGD, whose update is the gradient itself: AdamW scales
    every gradient to a step of about the learning rate, so the cross-attention keys' gradients, which nearly cancel
    over the tiny model's padded text (50x smaller than the rest), would turn float rounding into a visible update."""
    model = tiny_models("wan-2.1")
    keys = {"epochs": 1, "backup_after_unit": "NEVER", "learning_rate": 0.3,
            "optimizer": {"optimizer": "SGD", "weight_decay": 0.0}}
    single = make_config(tmp_path, "single", model, dataset, batch_size=1, **keys)
    split = make_config(tmp_path, "context", model, dataset, batch_size=1, context_parallel={"degree": 2}, **keys)
    run(single, 1)
    output = run(split, 2)

    one, two = (json.loads((tmp_path / name / "workspace/result.json").read_text()) for name in ("single", "context"))
    assert one["steps"] == two["steps"] >= 3
    a, b = saved(tmp_path / "single/lora.safetensors"), saved(tmp_path / "context/lora.safetensors")
    assert a.keys() == b.keys()
    moved = max(v.abs().max().item() for k, v in a.items() if "lora_B" in k)  # LoRA B starts at 0
    assert moved > 1e-3  # it trained
    worst = max((a[k] - b[k]).abs().max().item() for k in a) / moved
    assert worst <= 1e-5, f"a trained tensor differs by {worst:.1e} of how far the LoRA moved"
    single_losses, context_losses = losses(tmp_path / "single/workspace"), losses(tmp_path / "context/workspace")
    assert single_losses.keys() == context_losses.keys()
    assert all(abs(single_losses[s] - context_losses[s]) <= 1e-5 * abs(single_losses[s]) for s in single_losses)
    print(f"context parallel 2 vs 1 process: {one['steps']} steps, trained tensors within {worst:.1e} of the change")
    assert "1 data-parallel group(s) of 2 sharing each clip's tokens (context parallel, ulysses attention)" in output.stderr
    assert two["encoder_calls"]["video"] < one["encoder_calls"]["video"]  # both ranks filled the cache


LATER = pytest.mark.skipif(not os.environ.get("MOTIONTUNE_LONG_CONTEXT_PARALLEL"),
                           reason="the later releases' transformer is LTX-2's class: set MOTIONTUNE_LONG_CONTEXT_PARALLEL=1 to run")


@pytest.mark.parametrize("release", ["ltx-2", pytest.param("ltx-2.3", marks=LATER), pytest.param("ltx-2.5", marks=LATER)])
def test_context_parallel_trains_ltx2_video_and_audio_as_one_process(tmp_path, tiny_models, release):
    """LTX-2 with `context_parallel` degree 2: the video tokens split over the two ranks, the audio tokens whole on both
    (their gradient divided by the degree); a clip with sound trains the same 3 steps as one process: the same loss and
    audio loss each step, and every trained tensor (the audio stream's and the cross-modal attentions' too) within 1e-5
    of how far the LoRA moved. SGD as for WAN above."""
    from motiontune.cli import main

    data = _clips_with_sound(tmp_path, 1)
    model = tiny_models(release)
    keys = dict(LTX2_KEYS, model_type=release.upper().replace("-", "_").replace(".", "_"))
    if release != "ltx-2":  # a sample at the end, rendered by both ranks through the stock pipeline
        keys.update(samples=[{"prompt": "moving shapes", "frames": 9, "height": 64, "width": 64, "steps": 2, "fps": 16}],
                    sample_after=1, sample_after_unit="EPOCH")
    single = make_config(tmp_path, "single", model, data, batch_size=1, **keys)
    split = make_config(tmp_path, "context", model, data, batch_size=1, context_parallel={"degree": 2}, **keys)
    # the single run reads the cache the ranks filled, and runs in this process: two start-ups fewer
    single.write_text(json.dumps(json.loads(single.read_text()) | {"cache_dir": json.loads(split.read_text())["cache_dir"]}))
    err = run(split, 2).stderr
    assert main(["train", "--config", str(single)]) == 0

    one, two = (json.loads((tmp_path / name / "workspace/result.json").read_text()) for name in ("single", "context"))
    assert one["steps"] == two["steps"] == 3 and not any(one["encoder_calls"].values())
    a, b = saved(tmp_path / "single/lora.safetensors"), saved(tmp_path / "context/lora.safetensors")
    assert a.keys() == b.keys() and any("audio" in k for k in a)
    moved = max(v.abs().max().item() for k, v in a.items() if "lora_B" in k)  # LoRA B starts at 0
    assert moved > 1e-3 and max(v.abs().max().item() for k, v in a.items() if "lora_B" in k and "audio_attn1" in k) > 1e-4
    worst = max((a[k] - b[k]).abs().max().item() for k in a) / moved
    assert worst <= 1e-5, f"a trained tensor differs by {worst:.1e} of how far the LoRA moved"
    for tag in ("loss", "loss/audio"):
        single_losses, context_losses = losses(tmp_path / "single/workspace", tag), losses(tmp_path / "context/workspace", tag)
        assert single_losses.keys() == context_losses.keys() and len(single_losses) == 3
        assert all(abs(single_losses[s] - context_losses[s]) <= 1e-5 * abs(single_losses[s]) for s in single_losses)
    print(f"{release} context parallel 2 vs 1 process: 3 steps, trained tensors within {worst:.1e} of the change")
    if release != "ltx-2":
        assert len(list((tmp_path / "context/workspace/samples").glob("*.mp4"))) == 1
    assert "1 data-parallel group(s) of 2 sharing each clip's tokens (context parallel, ulysses attention)" in err


LTX2_KEYS = {"model_type": "LTX_2", "resolution": "64", "epochs": 1, "backup_after_unit": "NEVER", "learning_rate": 0.3,
             "optimizer": {"optimizer": "SGD", "weight_decay": 0.0},
             "video_config": {"max_frames": 9, "target_fps": 16.0, "video_batch_size_multiplier": 1.0}}


def _clips_with_sound(tmp_path: Path, count: int) -> Path:
    """`count` 0.75 s clips of moving colours with a stereo tone each (a different pitch), captioned."""
    from motiontune.testing.clips import write_clip_with_tone

    data = tmp_path / "tone"
    data.mkdir()
    for index in range(count):
        write_clip_with_tone(data / f"tone{index}.mkv", 0.75, fps=16, tones=((0.0, 440.0 * (index + 1)),), layout="stereo")
        (data / f"tone{index}.txt").write_text(["moving shapes", "a high tone"][index % 2] + "\n")
    return data


@pytest.mark.skipif(not os.environ.get("MOTIONTUNE_LONG_CONTEXT_PARALLEL"),
                    reason="4 processes on a small machine take minutes: set MOTIONTUNE_LONG_CONTEXT_PARALLEL=1 to run")
@pytest.mark.parametrize("family", ["wan-2.1", "ltx-2"])
def test_four_ranks_data_2_by_context_2_equal_one_process_with_batch_2(tmp_path, tiny_models, dataset, family):
    """4 gloo ranks with context_parallel degree 2: two data-parallel groups of two ranks sharing each clip's tokens,
    batch_size 1 each, train what one process with batch_size 2 trains (SGD, as above): every step's loss and every
    trained tensor within 1e-5. WAN's two clips differ in length, so a bucket's last batch of 1 leaves the second
    group idle; LTX-2's two clips have sound."""
    keys = {"epochs": 1, "backup_after_unit": "NEVER", "learning_rate": 0.3, "optimizer": {"optimizer": "SGD", "weight_decay": 0.0}}
    if family == "ltx-2":
        dataset, keys = _clips_with_sound(tmp_path, 2), dict(LTX2_KEYS)
    model = tiny_models(family)
    single = make_config(tmp_path, "single", model, dataset, batch_size=2, **keys)
    four = make_config(tmp_path, "four", model, dataset, batch_size=1, context_parallel={"degree": 2}, **keys)
    run(single, 1)
    output = run(four, 4)

    one, two = (json.loads((tmp_path / name / "workspace/result.json").read_text()) for name in ("single", "four"))
    assert one["steps"] == two["steps"] == (4 if family == "wan-2.1" else 3)  # WAN: per bucket a batch of 2 and one of 1
    a, b = saved(tmp_path / "single/lora.safetensors"), saved(tmp_path / "four/lora.safetensors")
    assert a.keys() == b.keys()
    moved = max(v.abs().max().item() for k, v in a.items() if "lora_B" in k)
    assert moved > 1e-3
    worst = max((a[k] - b[k]).abs().max().item() for k in a) / moved
    single_losses, four_losses = losses(tmp_path / "single/workspace"), losses(tmp_path / "four/workspace")
    assert single_losses.keys() == four_losses.keys()
    loss_gap = max(abs(single_losses[s] - four_losses[s]) / abs(single_losses[s]) for s in single_losses)
    print(f"{family}: 4 ranks (data 2 x context 2) vs 1 process with batch 2: {one['steps']} steps, losses within "
          f"{loss_gap:.1e}, trained tensors within {worst:.1e} of the change")
    assert worst <= 1e-5, f"a trained tensor differs by {worst:.1e} of how far the LoRA moved"
    assert loss_gap <= 1e-5
    assert "2 data-parallel group(s) of 2 sharing each clip's tokens" in output.stderr


@pytest.mark.skipif(not os.environ.get("MOTIONTUNE_LONG_CONTEXT_PARALLEL"),
                    reason="ring attention on the CPU is checked apart from the suite: set MOTIONTUNE_LONG_CONTEXT_PARALLEL=1 to run")
@pytest.mark.parametrize("family", ["wan-2.1", "ltx-2"])
def test_ring_attention_on_the_cpu_trains_what_one_process_trains(tmp_path, tiny_models, dataset, family):
    """`context_parallel` degree 2 with ring attention over gloo (diffusers' ring with PyTorch's CPU flash-attention
    kernel, which returns the log-sum-exp the ring merges by): the same losses and LoRA as one process (SGD)."""
    keys = {"epochs": 1, "backup_after_unit": "NEVER", "learning_rate": 0.3, "optimizer": {"optimizer": "SGD", "weight_decay": 0.0}}
    if family == "ltx-2":
        dataset, keys = _clips_with_sound(tmp_path, 1), dict(LTX2_KEYS)
    model = tiny_models(family)
    single = make_config(tmp_path, "single", model, dataset, batch_size=1, **keys)
    ring = make_config(tmp_path, "ring", model, dataset, batch_size=1, context_parallel={"degree": 2, "attention": "ring"}, **keys)
    run(single, 1)
    output = run(ring, 2)

    one, two = (json.loads((tmp_path / name / "workspace/result.json").read_text()) for name in ("single", "ring"))
    assert one["steps"] == two["steps"] >= 3
    a, b = saved(tmp_path / "single/lora.safetensors"), saved(tmp_path / "ring/lora.safetensors")
    moved = max(v.abs().max().item() for k, v in a.items() if "lora_B" in k)
    assert a.keys() == b.keys() and moved > 1e-3
    worst = max((a[k] - b[k]).abs().max().item() for k in a) / moved
    single_losses, ring_losses = losses(tmp_path / "single/workspace"), losses(tmp_path / "ring/workspace")
    assert single_losses.keys() == ring_losses.keys()
    loss_gap = max(abs(single_losses[s] - ring_losses[s]) / abs(single_losses[s]) for s in single_losses)
    print(f"{family}: ring attention, 2 ranks vs 1 process: {one['steps']} steps, losses within {loss_gap:.1e}, trained "
          f"tensors within {worst:.1e} of the change")
    assert worst <= 1e-5 and loss_gap <= 1e-5
    assert "(context parallel, ring attention)" in output.stderr
