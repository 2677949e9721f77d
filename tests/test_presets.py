"""Every shipped preset runs as a user runs it: `motiontune train --config "<preset>"`, end to end.

Each preset in motiontune/config/presets/ (a new file is picked up without editing this test) trains a tiny
random model of its own family with its own method, dtypes, memory options (FLOAT_8 weights, gradient
checkpointing, ...), experts, embedding settings and samples. Only these are overridden: the size (resolution,
max_frames, the samples' height / width / frames / steps), the paths (model, clips, workspace, cache, output),
the epochs (2), and backups every step so that the run can be killed after its first one. A preset that ships
no sample (I2V: a sample needs a first frame the preset cannot know, FLF2V a first and a last; VACE: a control video;
Animate: pose and face videos and a reference picture) gets one, with an image or the condition videos beside the clips.

The data: four clips of different shapes and lengths — a 16:9 VP8 WebM (1 s), a square H.264 (10 s), a portrait
clip that is landscape on disk with rotation metadata (1.5 s), and a 16:9 variable-frame-rate clip (2.5 s). At
the tiny resolution they fill two aspect buckets of two clips each, so a preset whose video batch holds two
clips (`#wan 2.2 Embedding`: batch 4 × multiplier 0.5) routes batches to both WAN 2.2 A14B experts at once.

The process settings are the other override: encoding in a child process and decoding in worker processes (the
users' defaults) each cost an interpreter start, so the presets in USER_PROCESSES keep them (sound, and conditions of
every role, go through the encoding child there) and the others encode and decode in the run's own process.

Each run: started in a process of its own (forked from a server that imported the trainer once), SIGKILLed once its first backup is complete, continued with `--resume` to
the end (in-process, which saves an interpreter start), then checked: exit 0, every trained expert stepped
(result.json), the final sample written, the model file(s) of the preset's method and format saved.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from collections import Counter
from fractions import Fraction
from pathlib import Path

import av
import pytest
from PIL import Image
from safetensors.torch import load_file

import forked_command
from conftest import DATA
from motiontune.cli import main
from motiontune.config.load import PRESETS_DIR
from motiontune.configure import load_config, validate
from motiontune.models.registry import family_class, model_types, tiny_family, tiny_model
from motiontune.testing.clips import write_timestamped_clip

PRESETS = sorted(PRESETS_DIR.glob("*.json"))

# the smallest training size of each family: VAE compression × patch size (TI2V-5B's VAE is 16×, patch 2; LTX-2's
# VAE is 32× and its decoder needs two latent pixels a side)
RESOLUTION = {"wan-2.2-ti2v-5b": 64, "ltx-2": 64, "ltx-2.3": 64, "ltx-2.5": 64}
VIDEO_FRAMES = 5  # a 4n+1 count: two latent frames
SAMPLE_STEPS = 2
EPOCHS = 2
PROMPT = "a person walking in a city street"
TIMEOUT = 600
USER_PROCESSES = {"#ltx 2 LoRA", "#wan 2.2 Animate LoRA"}  # sound; pose, face and reference videos


@pytest.fixture(scope="session")
def preset_data(tmp_path_factory) -> dict[str, Path]:
    """The same four clips twice: captions for LoRA / fine-tune runs, and captions that use the presets'
    `<embedding>` placeholder for embedding runs; plus a first frame for image-to-video samples."""
    root = tmp_path_factory.mktemp("preset-data")
    made = root / "made"
    made.mkdir()
    shutil.copy(DATA / "big_buck_bunny_432_433.webm", made / "bunny.webm")  # 1280x720 VP8, 24 fps, 1 s
    shutil.copy(DATA / "shapes_200px_30fps.mp4", made / "shapes.mp4")  # 200x200 H.264, 30 fps, 10 s
    # stored 48 wide × 32 tall, shown rotated a quarter turn: a portrait clip, 1.5 s at 25 fps
    write_timestamped_clip(made / "portrait.mp4", [Fraction(i, 25) for i in range(38)], rotation=90, size=(32, 48))
    # 16:9, variable frame rate as phones record: bursts at 60 fps, gaps of 100-200 ms, 2.5 s
    times = sorted({Fraction(round(t * 1000), 1000) for t in
                    [i / 60 for i in range(30)] + [0.6 + i * 0.1 for i in range(8)] + [1.5 + i / 60 for i in range(30)]
                    + [2.1 + i * 0.2 for i in range(3)]})
    write_timestamped_clip(made / "vfr.mp4", times, size=(36, 64))
    captions = {"bunny": "a rabbit in a forest", "shapes": "moving shapes", "portrait": "a clip shot up close",
                "vfr": "a test pattern moving fast"}
    folders = {}
    for kind, prefix in (("plain", ""), ("embedding", "<embedding> ")):
        folder = root / kind
        folder.mkdir()
        for clip in made.iterdir():
            shutil.copy(clip, folder / clip.name)
            (folder / clip.name).with_suffix(".txt").write_text(prefix + captions[clip.stem] + "\n")
            # a control (and pose and face) video beside each clip (the clip itself), for the models that follow one
            for role in ("control", "pose", "face"):
                shutil.copy(clip, folder / f"{clip.stem}-{role}{clip.suffix}")
        folders[kind] = folder
    with av.open(str(made / "shapes.mp4")) as container:
        frame = next(container.decode(video=0)).to_ndarray(format="rgb24")
    Image.fromarray(frame).save(root / "first_frame.png")
    folders["image"] = root / "first_frame.png"
    return folders


@pytest.fixture(scope="session")
def preset_cache(tmp_path_factory) -> Path:
    """One cache for every preset of the session: presets of one family reuse each other's latents."""
    return tmp_path_factory.mktemp("preset-cache")


def preset_overrides(preset: dict, model: Path, family: str, data: dict[str, Path], cache: Path, out: Path,
                     user_processes: bool = False) -> list[str]:
    """`--set` lines that change only size, paths and epochs (and give an I2V preset the sample it cannot ship)."""
    size = RESOLUTION.get(family, 32)
    still = preset.get("video_config", {}).get("max_frames", 16) == 1  # HiDream: frames of the videos
    frames = 1 if still else VIDEO_FRAMES
    method = preset.get("training_method", "LORA")
    destination = out / "models" / Path(preset["output_model_destination"]).name
    sets = {
        "base_model_name": str(model),
        "concepts": [{"path": str(data["embedding" if method == "EMBEDDING" else "plain"])}],
        "workspace_dir": str(out / "workspace"),
        "cache_dir": str(cache),
        "output_model_destination": str(destination),
        "resolution": str(size),
        "video_config.max_frames": frames,
        "epochs": EPOCHS,
    }
    if not user_processes:
        sets.update({"encode_in_child": False, "dataloader_threads": 0})
    if preset.get("samples"):
        for index, _ in enumerate(preset["samples"]):
            sets.update({f"samples.{index}.height": size, f"samples.{index}.width": size,
                         f"samples.{index}.frames": frames, f"samples.{index}.steps": SAMPLE_STEPS})
    elif family_class(preset["model_type"]).first_frame(preset["model_type"]) == "required":  # I2V, FLF2V
        sets["samples"] = [{"prompt": PROMPT, "image": str(data["image"]), "height": size, "width": size,
                            "frames": frames, "steps": SAMPLE_STEPS, "seed": 42}]
        if preset.get("last_frame_conditioning_probability", 0) >= 1:  # trained only with a last frame (FLF2V)
            sets["samples"][0]["last_image"] = str(data["image"])
    elif roles := family_class(preset["model_type"]).sample_roles(validate(preset)):  # VACE, Animate, IC-LoRA
        # the conditions every sample needs (VACE's mask and reference are optional)
        given = {role: str(data["image"] if role == "reference" else data["plain"] / f"shapes-{role}.mp4")
                 for role, needed in roles.items() if needed}
        sets["samples"] = [{"prompt": PROMPT, **given, "height": size, "width": size, "frames": frames,
                            "steps": SAMPLE_STEPS, "seed": 42}]
    return [f"{key}={json.dumps(value)}" for key, value in sets.items()]


def expected_outputs(config, destination: Path) -> list[Path]:
    """What the preset's method saves: one file or folder, or one per trained WAN 2.2 A14B expert."""
    if config.training_method == "EMBEDDING":
        return [destination]
    choice = config.expert_choice() if config.model_type in ("WAN_2_2_T2V_A14B", "WAN_2_2_I2V_A14B") else None
    if choice != "both":
        return [destination]
    folder = config.output_model_format == "DIFFUSERS"
    stem, suffix = (destination.name, "") if folder else (destination.stem, destination.suffix)
    return [destination.with_name(f"{stem}_{label}{suffix}") for label in ("high_noise", "low_noise")]


def trained_expert_labels(config) -> list[str]:
    if config.model_type not in ("WAN_2_2_T2V_A14B", "WAN_2_2_I2V_A14B"):
        return []
    return {"both": ["high_noise", "low_noise"], "high": ["high_noise"], "low": ["low_noise"]}[config.expert_choice()]


def command(preset: str, overrides: list[str], *extra: str) -> list[str]:
    return ["train", "--config", preset, *[a for o in overrides for a in ("--set", o)], *extra]


def tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def wait_for_first_backup(workspace: Path, process, log: Path, shown: str) -> Path:
    """A backup folder is written under a temporary name and renamed when complete: any `step-*` is whole."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        backups = sorted((workspace / "backup").glob("step-*"))
        if backups:
            return backups[0]
        if process.exitcode is not None:
            break
        time.sleep(0.05)
    process.kill()
    process.join()
    raise AssertionError(f"{shown}: no backup appeared (exit code {process.exitcode}):\n{tail(log.read_text())}")


@pytest.mark.parametrize("model_type", model_types())
def test_each_model_type_has_a_tiny_model_of_its_own_kind(model_type):
    """The tiny model the presets of a model type train (`ModelFamily.tiny_model`, TINY_MODELS in MODEL_TYPES' order):
    its own family's, named with words of the model type (wan-2.2-i2v-a14b for WAN_2_2_I2V_A14B: a family that lists
    TINY_MODELS in another order fails here), and an image-to-video one exactly where the model type needs a first
    frame."""
    family, tiny = family_class(model_type), tiny_model(model_type)
    assert tiny_family(tiny) is family, f"{model_type} → {tiny}, a tiny model of another family"
    words = Counter(tiny.replace(".", "-").split("-"))
    assert not words - Counter(model_type.lower().split("_")), f"{model_type} → {tiny}: not its tiny model"
    image_to_video = bool({"i2v", "flf2v"} & set(words))  # FLF2V: first and last frame
    assert image_to_video == (family.first_frame(model_type) == "required"), f"{model_type} → {tiny}"


@pytest.mark.parametrize("preset_file", PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_trains_is_killed_resumes_and_finishes(preset_file, tmp_path, tiny_models, preset_data, preset_cache, capsys):
    preset = json.loads(preset_file.read_text())
    model_type = preset.get("model_type", "WAN_2_1_T2V")
    family = tiny_model(model_type)  # the tiny model that stands in for it, as its family declares
    name = preset_file.stem
    overrides = preset_overrides(preset, tiny_models(family), family, preset_data, preset_cache, tmp_path,
                                 user_processes=name in USER_PROCESSES)
    config = load_config(name, overrides)  # what the CLI will read: for the expected outputs
    workspace, destination = Path(config.workspace_dir), Path(config.output_model_destination)
    shown = "motiontune " + " ".join(f'"{a}"' if " " in a or "#" in a else a for a in command(name, overrides))

    # 1. the run, backing up after every step, killed with SIGKILL once its first backup is complete
    every_step = ["backup_after=1", "backup_after_unit=STEP"]
    first_log = tmp_path / "first-run.log"
    first = f"{shown} --set backup_after=1 --set backup_after_unit=STEP"
    process = forked_command.start(command(name, overrides + every_step), first_log)
    backup = wait_for_first_backup(workspace, process, first_log, first)
    process.kill()  # SIGKILL
    process.join(timeout=60)
    backup = sorted((workspace / "backup").glob("step-*"))[-1]  # it may have backed up again before the kill landed
    assert process.exitcode == -signal.SIGKILL, (
        f"{first} ended (exit {process.exitcode}) before it could be killed:\n{tail(first_log.read_text())}")
    assert not any(p.exists() for p in expected_outputs(config, destination)), "killed before the end, yet saved"

    # 2. --resume to the end (the preset's own backup interval again: a setting a resumed run may change)
    capsys.readouterr()
    try:
        code = main(command(name, overrides, "--resume"))
    except BaseException as error:  # a traceback: report it with the command
        raise AssertionError(f"{shown} --resume raised {error!r}\n{tail(capsys.readouterr().err)}") from error
    captured = capsys.readouterr()
    output = captured.err + captured.out
    assert code == 0, f"{shown} --resume exited {code}:\n{tail(output)}"
    assert "continuing from" in output and backup.name in output, tail(output)

    # 3. what the finished run left: result, experts, sample, model file(s)
    result = json.loads((workspace / "result.json").read_text())
    assert not result["interrupted"] and result["steps"] > json.loads((backup / "backup.json").read_text())["step"]
    for label in trained_expert_labels(config):  # each trained WAN 2.2 A14B expert got samples and stepped
        assert result.get("experts", {}).get(label, {}).get("steps", 0) > 0, f"{label} expert never stepped: {result.get('experts')}"
        assert result["experts"][label].get("samples", 0) > 0, result["experts"]
    assert len(result["samples"]) == len(config.samples) >= 1, (result["samples"], tail(output))
    for sample in result["samples"]:  # the end-of-run sample (the presets sample every 5 or 10 epochs)
        assert Path(sample).name.startswith("final-") and sample.endswith(".mp4"), sample
        with av.open(sample) as container:
            assert sum(1 for _ in container.decode(video=0)) >= 1, sample
    expected = expected_outputs(config, destination)
    assert set(map(str, expected)) <= set(result["loras"]), (result["loras"], expected)
    for path in expected:
        if config.output_model_format == "DIFFUSERS":  # a diffusers folder: config and weights
            assert (path / "config.json").is_file() and list(path.glob("*.safetensors")), sorted(path.rglob("*"))
        else:
            assert path.is_file() and path.suffix == ".safetensors" and load_file(str(path)), path
