"""`motiontune lora check | convert | merge | resize` on the files motiontune writes, against the real loaders.

Each model type's tiny transformer gets adapters from the trainer's own `lora.prepare`, set to random values (as if
trained: lora_B no longer zero), saved by the trainer's own `lora.save` as COMFY_LORA and DIFFUSERS_LORA (lora_alpha 3,
rank 4: a lost alpha shows). The references are diffusers' own: the stock pipeline's `load_lora_weights` (or, for
HunyuanVideo 1.5, which has none, the transformer's `load_lora_adapter`) and `fuse_lora`.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from motiontune.cli import main
from test_lora_formats import hunyuan_width, plain_weights, real_width_as, relative_difference, stock_pipeline

RANK, ALPHA = 4, 3
EQUAL = 1e-6
# model type → tiny model; WAN 2.2 A14B with both experts (the low-noise file is the second transformer's)
MODEL_TYPES = {
    "WAN_2_1_T2V": "wan-2.1",
    "WAN_2_2_T2V_A14B": "wan-2.2-a14b",
    "HUNYUAN_VIDEO": "hunyuan-video",
    "HI_DREAM_DEV": "hi-dream",
    "HUNYUAN_VIDEO_1_5": "hunyuan-video-1.5",
    "LTX_2": "ltx-2",
}
KINDS = {"LoRA": {}, "DoRA": {"lora_decompose": True}, "LoHa": {"peft_type": "LOHA"}, "LoKr": {"peft_type": "LOKR"},
         # a LoKr whose second factor is split (rank 4 of a 12 x 12 factor of the tiny WAN's 96-wide layers)
         "LoKr-split": {"peft_type": "LOKR", "lokr_dim": RANK}}


def write_loras(model_type: str, model: Path, folder: Path, **keys) -> dict[str, list[Path]]:
    """format → the files (one per expert) of one set of random adapters on the tiny model."""
    from motiontune.config import TrainConfig
    from motiontune.methods import lora
    from motiontune.models import family_for

    config = TrainConfig.model_validate({"model_type": model_type, "base_model_name": str(model), "lora_rank": RANK,
                                         "lora_alpha": ALPHA, "train_dtype": "FLOAT_32", **keys})
    family = family_for(config, torch.device("cpu"))
    family.load_transformers()
    torch.manual_seed(0)
    for expert in family.trained_experts():
        for parameter in lora.prepare(family, expert, config):
            parameter.data.normal_(std=0.2)
    return {output: lora.save(family, config, folder / f"{output.lower()}.safetensors", output)
            for output in ("COMFY_LORA", "DIFFUSERS_LORA")}


@pytest.fixture(scope="module")
def loras(tiny_models, tmp_path_factory):
    """(model type, kind) → (tiny model, {format: files}); written once, on first use."""
    done = {}

    def get(model_type: str, kind: str = "LoRA"):
        if (model_type, kind) not in done:
            model = tiny_models(MODEL_TYPES[model_type])
            keys = {"experts": "both"} if model_type == "WAN_2_2_T2V_A14B" else {}
            folder = tmp_path_factory.mktemp(f"{model_type.lower()}-{kind.lower()}")
            done[model_type, kind] = model, write_loras(model_type, model, folder, **KINDS[kind], **keys)
        return done[model_type, kind]

    return get


def show(capsys, text: str) -> None:
    """A figure for the closing note, past the capture that reads the commands' output."""
    with capsys.disabled():
        print(text)


def run(capsys, *argv) -> tuple[int, str]:
    code = main(["lora", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out + out.err


def check(capsys, path: Path, model_type: str, model: Path, *more) -> tuple[int, str]:
    with real_width_as(32 if model_type == "HUNYUAN_VIDEO" else None):  # diffusers' HunyuanVideo converter: see there
        return run(capsys, "check", path, "--model-type", model_type, "--model", model, *more)


def summary(output: str) -> str:
    return next(line for line in output.splitlines() if line.startswith("summary:"))


def table(output: str) -> dict[str, list[str]]:
    """key → its row's cells (adapts, kind, rank, alpha, dtype, diffusers, ComfyUI) from the check's table."""
    rows = {}
    for line in output.splitlines():
        cells = line.split()
        if line.startswith("  ") and len(cells) >= 8 and cells[0] != "key":
            key, rest = cells[0], cells[1:]
            if rest[0] == "text":  # "text encoder" is two words
                rest = ["text encoder", *rest[2:]]
            rows[key] = rest
    return rows


# --- check ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_check_says_every_key_loads_in_each_loader_meant_for_the_file(model_type, loras, capsys):
    model, files = loras(model_type)
    for output, paths in files.items():
        for path in paths:
            code, text = check(capsys, path, model_type, model)
            line = summary(text)
            show(capsys, f"{model_type} {output} {path.name}: {line}")
            assert code == 0, text
            if output == "COMFY_LORA":
                assert "ComfyUI: all keys load" in line
                if model_type == "HUNYUAN_VIDEO_1_5":  # diffusers has no reader of its original layout
                    assert "diffusers: not its format" in line
                else:
                    assert "diffusers: all keys load" in line
            else:
                assert "diffusers: all keys load" in line and "ComfyUI: not its format" in line
            rows = table(text)
            assert sorted(rows) == sorted(load_file(str(path)))
            assert {row[1] for row in rows.values()} == {"LoRA"} and {row[4] for row in rows.values()} == {"float32"}


@pytest.mark.parametrize("kind", ["DoRA", "LoHa", "LoKr"])
def test_check_on_lycoris_files(kind, loras, capsys):
    """ComfyUI takes every key of each COMFY_LORA kind; diffusers every key of the DIFFUSERS_LORA DoRA and LoKr (LoHa
    has no diffusers loader: said, not counted)."""
    model, files = loras("WAN_2_1_T2V", kind)
    code, text = check(capsys, files["COMFY_LORA"][0], "WAN_2_1_T2V", model)
    show(capsys, f"{kind} COMFY_LORA: {summary(text)}")
    assert code == 0 and "ComfyUI: all keys load" in summary(text) and "diffusers: not its format" in summary(text)
    assert {row[1] for row in table(text).values()} == {kind}
    code, text = check(capsys, files["DIFFUSERS_LORA"][0], "WAN_2_1_T2V", model)
    show(capsys, f"{kind} DIFFUSERS_LORA: {summary(text)}")
    assert code == 0
    assert ("diffusers: not its format" if kind == "LoHa" else "diffusers: all keys load") in summary(text)


def test_check_lists_exactly_three_renamed_keys(loras, capsys, tmp_path):
    """Three lora_A keys renamed: both loaders skip exactly those (an unknown module) and their modules' other keys
    (an entry without its lora_A), nothing else; the stock pipeline really refuses the file, and loads it once the
    keys listed are gone."""
    model, files = loras("WAN_2_1_T2V")
    entries = load_file(str(files["COMFY_LORA"][0]))
    renamed = sorted(k for k in entries if k.endswith(".lora_A.weight"))[::7][:3]
    for key in renamed:
        entries[key.replace(".lora_A.weight", "_renamed.lora_A.weight")] = entries.pop(key)
    save_file(entries, str(tmp_path / "renamed.safetensors"))
    code, text = check(capsys, tmp_path / "renamed.safetensors", "WAN_2_1_T2V", model)
    show(capsys, summary(text))
    assert code == 1
    new_names = {k.replace(".lora_A.weight", "_renamed.lora_A.weight") for k in renamed}
    partners = {k.replace("lora_A.weight", s) for k in renamed for s in ("lora_B.weight", "alpha")}
    for loader in ("diffusers", "ComfyUI"):
        skipped = dict(re.findall(rf"^{loader} skips (\S+): (.*)$", text, re.M))
        assert set(skipped) == new_names | partners, loader
        show(capsys, f"{loader}: skips {len(skipped)} keys: the 3 renamed ({skipped[min(new_names)]}) and their partners")
    assert "diffusers: skips 9 of 60 keys" in summary(text) and "ComfyUI: skips 9 of 60 keys" in summary(text)

    pipe = stock_pipeline("WAN_2_1_T2V", model)
    with pytest.raises(Exception):
        pipe.load_lora_weights(str(tmp_path / "renamed.safetensors"))
    kept = {k: v for k, v in entries.items() if k not in new_names | partners}
    pipe = stock_pipeline("WAN_2_1_T2V", model)
    pipe.load_lora_weights(kept)


def test_check_lists_the_audio_keys_and_drop_audio_leaves_the_video(loras, capsys, tmp_path):
    """LTX-2: the keys check says adapt audio are exactly those of the audio stream and the cross-modal attention;
    `--drop audio` writes a copy without them, which passes the check, and which the stock pipeline loads into the
    same video weights as the whole file while the audio weights stay the base model's."""
    model, files = loras("LTX_2")
    path = files["COMFY_LORA"][0]
    code, text = check(capsys, path, "LTX_2", model)
    audio = {key for key, row in table(text).items() if row[0] == "audio"}
    entries = load_file(str(path))
    assert code == 0 and audio == {k for k in entries if "audio" in k}
    assert {row[0] for key, row in table(text).items() if key not in audio} == {"video"}
    show(capsys, f"LTX-2: {len(audio)} of {len(entries)} keys adapt audio; {summary(text)}")

    code, text = check(capsys, path, "LTX_2", model, "--drop", "audio", "--out", tmp_path / "video-only.safetensors")
    assert code == 0 and "all keys load" in summary(text) and "audio" not in summary(text)
    video_only = load_file(str(tmp_path / "video-only.safetensors"))
    assert sorted(video_only) == sorted(set(entries) - audio)

    def fused(lora_path):
        pipe = stock_pipeline("LTX_2", model)
        pipe.load_lora_weights(str(lora_path))
        pipe.fuse_lora(components=["transformer"])
        return plain_weights(pipe.transformer)

    whole, dropped, base = fused(path), fused(tmp_path / "video-only.safetensors"), plain_weights(stock_pipeline("LTX_2", model).transformer)
    audio_weights = [k for k in base if "audio" in k]
    video_weights = [k for k in base if k not in audio_weights]
    assert all(torch.equal(dropped[k], base[k]) for k in audio_weights)
    assert all(torch.equal(dropped[k], whole[k]) for k in video_weights)
    assert any(not torch.equal(whole[k], base[k]) for k in audio_weights)  # the whole file did change them


def comfy_updates(entries: dict) -> dict:
    """module → the weight change ComfyUI applies for it: B·A · alpha / rank (1 without `.alpha`)."""
    updates = {}
    for key, down in entries.items():
        if key.endswith(".lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            alpha = entries.get(f"{module}.alpha")
            scale = 1.0 if alpha is None else alpha.item() / down.shape[0]
            updates[module] = scale * entries[f"{module}.lora_B.weight"].double() @ down.double()
    return updates


def transformer_class(model_type: str):
    """The diffusers class of the model type's transformer (WAN's depends on the model type: VACE has its own)."""
    import diffusers

    from motiontune.config import TrainConfig
    from motiontune.models.registry import family_for

    family = family_for(TrainConfig.model_validate({"model_type": model_type, "concepts": [{"path": "."}]}), None)
    return getattr(diffusers, family.transformer_class_name)


def stock_transformer(model_type: str, model: Path, expert: str = "transformer"):
    return transformer_class(model_type).from_pretrained(model, subfolder=expert)


# --- convert --------------------------------------------------------------------------------------------------------
def fused_in_diffusers(model_type: str, model: Path, path: Path, expert: str = "transformer") -> dict:
    """The transformer's weights after the stock loader reads `path` and `fuse_lora`."""
    if model_type == "HUNYUAN_VIDEO_1_5":  # no load_lora_weights in its pipeline: the transformer's own loader
        transformer = stock_transformer(model_type, model, expert)
        transformer.load_lora_adapter(str(path), prefix="transformer")
        transformer.fuse_lora()
        return plain_weights(transformer)
    pipe = stock_pipeline(model_type, model)
    with real_width_as(hunyuan_width(model_type, pipe.transformer)):
        pipe.load_lora_weights(str(path), **({"load_into_transformer_2": True} if expert == "transformer_2" else {}))
    pipe.fuse_lora(components=[expert])
    return plain_weights(getattr(pipe, expert))


@pytest.mark.parametrize("model_type", ["WAN_2_1_T2V", "HUNYUAN_VIDEO", "HUNYUAN_VIDEO_1_5"])
def test_convert_round_trips_and_the_diffusers_file_gives_the_same_weights(model_type, loras, capsys, tmp_path):
    """COMFY_LORA → DIFFUSERS_LORA → COMFY_LORA gives the file back; the DIFFUSERS_LORA file, read by the stock loader,
    gives the weights the COMFY_LORA file gives (HunyuanVideo 1.5: the run's own DIFFUSERS_LORA file, as diffusers
    reads no original-layout file of it)."""
    model, files = loras(model_type)
    comfy = files["COMFY_LORA"][0]
    common = ("--model-type", model_type, "--model", model)
    assert run(capsys, "convert", comfy, tmp_path / "d.safetensors", "--to", "DIFFUSERS_LORA", *common)[0] == 0
    assert run(capsys, "convert", tmp_path / "d.safetensors", tmp_path / "c.safetensors", "--to", "COMFY_LORA", *common)[0] == 0
    before, after = load_file(str(comfy)), load_file(str(tmp_path / "c.safetensors"))
    assert sorted(before) == sorted(after)
    if model_type == "HUNYUAN_VIDEO_1_5":
        # its DIFFUSERS_LORA folds alpha / rank into lora_B (its diffusers loader reads no alpha): the same update
        # comes back, as ComfyUI applies it, with `.alpha` = rank and lora_B scaled
        before, after = comfy_updates(before), comfy_updates(after)
    gap = max(((after[k] - before[k]).norm() / before[k].norm()).item() for k in before)
    assert gap == 0 if model_type != "HUNYUAN_VIDEO_1_5" else gap <= EQUAL
    reference = fused_in_diffusers(model_type, model, comfy if model_type != "HUNYUAN_VIDEO_1_5" else files["DIFFUSERS_LORA"][0])
    converted = fused_in_diffusers(model_type, model, tmp_path / "d.safetensors")
    base = plain_weights(stock_transformer(model_type, model))
    difference, change = relative_difference(converted, reference), relative_difference(reference, base)
    show(capsys, f"{model_type}: round trip largest relative difference {gap:.1e}; converted DIFFUSERS_LORA vs reference, "
          f"fused: {difference:.1e} (the LoRA changes weights by up to {change:.1e})")
    assert difference <= EQUAL and change > 1e-2
    assert check(capsys, tmp_path / "d.safetensors", model_type, model)[0] == 0


@pytest.mark.parametrize("kind", ["DoRA", "LoHa", "LoKr"])
def test_convert_lycoris_diffusers_file_to_the_runs_comfy_file(kind, loras, capsys, tmp_path):
    """A DIFFUSERS_LORA DoRA, LoHa or LoKr file converts to what the same run wrote as COMFY_LORA (DoRA's scale from
    the base weights' norms)."""
    model, files = loras("WAN_2_1_T2V", kind)
    code, _ = run(capsys, "convert", files["DIFFUSERS_LORA"][0], tmp_path / "c.safetensors", "--to", "COMFY_LORA",
                  "--model-type", "WAN_2_1_T2V", "--model", model)
    written, reference = load_file(str(tmp_path / "c.safetensors")), load_file(str(files["COMFY_LORA"][0]))
    assert code == 0 and sorted(written) == sorted(reference)
    gap = max(((written[k] - reference[k]).norm() / reference[k].norm()).item() for k in reference)
    show(capsys, f"{kind}: converted vs the run's COMFY_LORA: {gap:.1e}")
    assert gap <= EQUAL


# --- merge ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", ["WAN_2_1_T2V", "WAN_2_2_T2V_A14B", "HUNYUAN_VIDEO_1_5"])
def test_merge_equals_fuse_lora_and_the_single_file_loads_back(model_type, loras, capsys, tmp_path):
    """The merged transformer (a diffusers folder, and one original-layout file read by `from_single_file`) has the
    weights diffusers' `fuse_lora` gives from the same file (HunyuanVideo 1.5: from the run's DIFFUSERS_LORA file;
    diffusers cannot read a single file of it, so the folder only)."""
    import diffusers

    model, files = loras(model_type)
    path = files["COMFY_LORA"][-1]  # WAN 2.2 A14B: the low-noise expert's, into the second transformer
    expert = "transformer_2" if path.stem.endswith("_low_noise") else "transformer"
    cls = transformer_class(model_type)
    common = ("--base", model, "--model-type", model_type)
    assert run(capsys, "merge", path, "--out", tmp_path / "merged", *common)[0] == 0
    merged = plain_weights(cls.from_pretrained(tmp_path / "merged"))
    reference_file = files["DIFFUSERS_LORA"][-1] if model_type == "HUNYUAN_VIDEO_1_5" else path
    reference = fused_in_diffusers(model_type, model, reference_file, expert)
    base = plain_weights(stock_transformer(model_type, model, expert))
    gap, change = relative_difference(merged, reference), relative_difference(reference, base)
    show(capsys, f"{model_type} {expert}: merged folder vs fuse_lora {gap:.1e} (the LoRA changes weights by up to {change:.1e})")
    assert gap <= EQUAL and change > 1e-2
    if model_type == "HUNYUAN_VIDEO_1_5":
        return
    assert run(capsys, "merge", path, "--out", tmp_path / "merged.safetensors", *common)[0] == 0
    single = plain_weights(cls.from_single_file(str(tmp_path / "merged.safetensors"), config=str(model), subfolder=expert))
    single_gap = relative_difference(single, reference)
    show(capsys, f"{model_type} {expert}: merged single file, read by from_single_file, vs fuse_lora {single_gap:.1e}")
    assert single_gap <= EQUAL


# --- resize ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("output", ["COMFY_LORA", "DIFFUSERS_LORA"])
def test_resize_to_half_rank_reports_the_error_diffusers_measures(output, loras, capsys, tmp_path):
    """Rank 4 → 2: the reported relative error of the weight change equals the one measured in diffusers (the
    weights the resized file gives against those the original gives, over the change the original makes), per module
    too (-v); the resized file passes the check."""
    model, files = loras("WAN_2_1_T2V")
    path = files[output][0]
    code = main(["-v", "lora", "resize", str(path), str(tmp_path / "half.safetensors"), "--rank", "2"])
    text = capsys.readouterr().out
    assert code == 0
    reported = float(re.search(r"relative error of the weight change (\S+)", text)[1])
    per_module = {m: float(e) for m, e in re.findall(r"^  (\S+): relative error (\S+)$", text, re.M)}
    original = fused_in_diffusers("WAN_2_1_T2V", model, path)
    half = fused_in_diffusers("WAN_2_1_T2V", model, tmp_path / "half.safetensors")
    base = plain_weights(stock_pipeline("WAN_2_1_T2V", model).transformer)
    changed = [k for k in base if not torch.equal(original[k], base[k])]
    left = sum(((half[k] - original[k]).double().norm() ** 2).item() for k in changed)
    total = sum(((original[k] - base[k]).double().norm() ** 2).item() for k in changed)
    measured = (left / total) ** 0.5
    show(capsys, f"{output}: rank 4 → 2, reported relative error {reported:.4e}, measured in diffusers {measured:.4e}")
    assert abs(reported - measured) <= 1e-3 * measured
    module, error = next(iter(per_module.items()))
    weight = _weight_of(module, model) + ".weight"
    module_measured = ((half[weight] - original[weight]).norm() / (original[weight] - base[weight]).norm()).item()
    show(capsys, f"  {module}: reported {error:.4e}, measured {module_measured:.4e}")
    assert abs(error - module_measured) <= 1e-3 * module_measured
    code, text = check(capsys, tmp_path / "half.safetensors", "WAN_2_1_T2V", model)
    assert code == 0 and "rank 2" in summary(text)


def _weight_of(module: str, model: Path) -> str:
    """A WAN module named in either layout → its diffusers name."""
    from motiontune.lora_tools.target import target_for

    if module.startswith("transformer."):
        return module.removeprefix("transformer.")
    return target_for("WAN_2_1_T2V", model=str(model)).comfy_entries[module][0]


def test_resize_refuses_loha_and_comfy_dora_by_name(loras, capsys, tmp_path):
    model, files = loras("WAN_2_1_T2V", "LoHa")
    code, text = run(capsys, "resize", files["COMFY_LORA"][0], tmp_path / "x.safetensors", "--rank", "2")
    assert code == 2 and "LoHa file cannot be resized" in text and "Hadamard" in text
    model, files = loras("WAN_2_1_T2V", "DoRA")
    code, text = run(capsys, "resize", files["COMFY_LORA"][0], tmp_path / "x.safetensors", "--rank", "2")
    assert code == 2 and "ComfyUI DoRA file cannot be resized" in text
    code, text = run(capsys, "resize", files["DIFFUSERS_LORA"][0], tmp_path / "dora.safetensors", "--rank", "2")
    assert code == 0
    assert check(capsys, tmp_path / "dora.safetensors", "WAN_2_1_T2V", model)[0] == 0


def test_resize_lokr_second_factor(loras, capsys, tmp_path):
    """LoKr: its split second factor to half its rank; the error reported is the one measured after peft (through
    diffusers' `load_lora_adapter`) merges each file into the transformer."""
    model, files = loras("WAN_2_1_T2V", "LoKr-split")
    path = files["DIFFUSERS_LORA"][0]
    assert "lokr_w2_b" in " ".join(load_file(str(path)))
    code, text = run(capsys, "resize", path, tmp_path / "half.safetensors", "--rank", "2")
    assert code == 0, text
    reported = float(re.search(r"relative error of the weight change (\S+)", text)[1])

    def merged(lora_path: Path) -> dict:
        transformer = stock_transformer("WAN_2_1_T2V", model)
        transformer.load_lora_adapter(str(lora_path.parent), weight_name=lora_path.name, prefix="transformer")
        transformer.fuse_lora()
        return plain_weights(transformer)

    original, half = merged(path), merged(tmp_path / "half.safetensors")
    base = plain_weights(stock_transformer("WAN_2_1_T2V", model))
    left = sum(((half[k] - original[k]).double().norm() ** 2).item() for k in base)
    total = sum(((original[k] - base[k]).double().norm() ** 2).item() for k in base)
    measured = (left / total) ** 0.5
    show(capsys, f"LoKr w2 rank 4 → 2: reported relative error {reported:.4e}, measured after peft's merge {measured:.4e}")
    assert total > 0 and abs(reported - measured) <= 1e-3 * measured


def test_check_reads_the_runs_config_and_drops_text_encoder_keys(loras, capsys, tmp_path):
    """`--config run.json` names the model; text-encoder keys (here two of the kind other trainers add) are reported as
    such, ComfyUI's not checked, the stock WAN loader raises on them; `--drop text-encoder` leaves a file both load."""
    from conftest import base_config, write_config

    model, files = loras("WAN_2_1_T2V")
    entries = load_file(str(files["COMFY_LORA"][0]))
    entries["text_encoders.umt5xxl.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight"] = torch.zeros(4, 32)
    entries["text_encoders.umt5xxl.encoder.block.0.layer.0.SelfAttention.q.lora_B.weight"] = torch.zeros(32, 4)
    save_file(entries, str(tmp_path / "with-te.safetensors"))
    config = write_config(tmp_path / "run.json", **base_config(tmp_path, model, tmp_path))
    code, text = run(capsys, "check", tmp_path / "with-te.safetensors", "--config", config)
    rows = table(text)
    text_keys = {k for k, row in rows.items() if row[0] == "text encoder"}
    assert code == 1 and text_keys == {k for k in entries if k.startswith("text_encoders.")}
    assert {rows[k][-1] for k in text_keys} == {"?"} and {rows[k][-2] for k in text_keys} == {"SKIPPED"}
    assert "diffusers: skips 2 of 62 keys" in summary(text) and "ComfyUI: all keys load (60/60)" in summary(text)
    code, text = run(capsys, "check", tmp_path / "with-te.safetensors", "--config", config, "--drop", "text-encoder")
    show(capsys, f"text encoder dropped: {summary(text)}")
    assert code == 0 and "diffusers: all keys load (60/60); ComfyUI: all keys load (60/60)" in summary(text)


@pytest.mark.parametrize("kind", ["DoRA", "LoKr-split"])
def test_merge_dora_and_lokr_equal_fuse_lora(kind, loras, capsys, tmp_path):
    """The DIFFUSERS_LORA DoRA and LoKr files merge into the weights diffusers' `fuse_lora` gives (DoRA through the stock
    `load_lora_weights`; LoKr through `load_lora_adapter` with the file's folder, as docs/formats.md says)."""
    from diffusers import WanTransformer3DModel

    model, files = loras("WAN_2_1_T2V", kind)
    path = files["DIFFUSERS_LORA"][0]
    assert run(capsys, "merge", path, "--out", tmp_path / "merged", "--base", model, "--model-type", "WAN_2_1_T2V")[0] == 0
    merged = plain_weights(WanTransformer3DModel.from_pretrained(tmp_path / "merged"))
    if kind == "DoRA":
        reference = fused_in_diffusers("WAN_2_1_T2V", model, path)
    else:
        transformer = stock_transformer("WAN_2_1_T2V", model)
        transformer.load_lora_adapter(str(path.parent), weight_name=path.name, prefix="transformer")
        transformer.fuse_lora()
        transformer.unload_lora()  # the merged base layers stay, without the LoKr factors
        reference = plain_weights(transformer)
    gap = relative_difference(merged, reference)
    change = relative_difference(reference, plain_weights(stock_transformer("WAN_2_1_T2V", model)))
    show(capsys, f"{kind}: merged vs fuse_lora {gap:.1e} (the adapter changes weights by up to {change:.1e})")
    assert gap <= EQUAL and change > 1e-2


def test_check_against_another_model_size_skips_every_key_and_says_why(loras, capsys):
    """The tiny model's file checked against the released WAN 2.1 1.3B (its config, on the meta device): no weight has
    the file's shapes; both loaders skip every factor and say why."""
    _, files = loras("WAN_2_1_T2V")
    code, text = run(capsys, "check", files["COMFY_LORA"][0], "--model-type", "WAN_2_1_T2V")
    show(capsys, f"against the released 1.3B: {summary(text)}")
    # ComfyUI reads every `.alpha` of a module it knows; the 40 factors it cannot apply
    assert code == 1 and "diffusers: skips 60 of 60 keys" in summary(text) and "ComfyUI: skips 40 of 60 keys" in summary(text)
    assert summary(text).count("every key it skips has another shape") == 2
    assert "its update is 96 x 96, the weight 1536 x 1536" in text


# --- ComfyUI's own loaders (v0.30.0, the harness in tests/comfyui/ where it is present) ---------------------------
def comfy_skips(text: str) -> set[str]:
    return set(re.findall(r"^ComfyUI skips (\S+):", text, re.M))


def test_comfyui_loads_exactly_what_check_says(loras, capsys, tmp_path):
    """ComfyUI's LoraLoader on each family's COMFY_LORA file, a file with three lora_B keys renamed, the LTX-2 file
    without audio and a resized file: the keys it reports not loaded are exactly those `check` lists for ComfyUI; with
    three lora_A keys renamed it raises, as `check` says; its UNETLoader reads the merged single file with no missing
    or unexpected weight, into the merged weights."""
    harness = pytest.importorskip("comfyui.harness", reason="the ComfyUI harness (tests/comfyui) is not in this tree")
    try:
        harness.comfy_python(), harness.comfyui_folder()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    from motiontune.config import TrainConfig
    from motiontune.methods import finetune
    from motiontune.models import family_for

    def base_files(model_type: str, model: Path) -> dict[str, Path]:
        keys = {"experts": "both"} if model_type == "WAN_2_2_T2V_A14B" else {}
        config = TrainConfig.model_validate({"model_type": model_type, "base_model_name": str(model), "train_dtype": "FLOAT_32",
                                             "training_method": "FINE_TUNE", "output_model_format": "COMFY_TRANSFORMER", **keys})
        family = family_for(config, torch.device("cpu"))
        family.load_transformers()
        paths = finetune.save(family, config, tmp_path / model_type / "base.safetensors")
        return dict(zip([e.name for e in family.trained_experts()], paths))

    cases = []  # (model type, tiny model, base file, LoRA file)
    for model_type in MODEL_TYPES:
        model, files = loras(model_type)
        bases = base_files(model_type, model)
        for path in files["COMFY_LORA"]:
            cases.append((model_type, model, bases["transformer_2" if path.stem.endswith("_low_noise") else "transformer"], path))
    wan_model, wan_files = loras("WAN_2_1_T2V")
    wan_base = next(c[2] for c in cases if c[0] == "WAN_2_1_T2V")
    for factor in ("lora_A", "lora_B"):  # three of each renamed
        entries = load_file(str(wan_files["COMFY_LORA"][0]))
        for key in sorted(k for k in entries if k.endswith(f".{factor}.weight"))[::7][:3]:
            entries[key.replace(f".{factor}.weight", f"_renamed.{factor}.weight")] = entries.pop(key)
        save_file(entries, str(tmp_path / f"renamed-{factor}.safetensors"))
    cases.append(("WAN_2_1_T2V", wan_model, wan_base, tmp_path / "renamed-lora_B.safetensors"))
    assert run(capsys, "resize", wan_files["COMFY_LORA"][0], tmp_path / "half.safetensors", "--rank", "2")[0] == 0
    cases.append(("WAN_2_1_T2V", wan_model, wan_base, tmp_path / "half.safetensors"))
    ltx_model, ltx_files = loras("LTX_2")
    check(capsys, ltx_files["COMFY_LORA"][0], "LTX_2", ltx_model, "--drop", "audio", "--out", tmp_path / "video.safetensors")
    cases.append(("LTX_2", ltx_model, next(c[2] for c in cases if c[0] == "LTX_2"), tmp_path / "video.safetensors"))
    assert run(capsys, "merge", wan_files["COMFY_LORA"][0], "--base", wan_model, "--model-type", "WAN_2_1_T2V",
               "--out", tmp_path / "merged.safetensors")[0] == 0

    jobs = [harness.ComfyJob(t, base, path, model) for t, model, base, path in cases]
    jobs.append(harness.ComfyJob("WAN_2_1_T2V", tmp_path / "merged.safetensors", None, wan_model))
    results = harness.run_comfy(jobs)
    for (model_type, model, _, path), result in zip(cases, results):
        said = comfy_skips(check(capsys, path, model_type, model)[1])
        show(capsys, f"{model_type} {path.name}: ComfyUI applied {result.lora_keys - len(result.not_loaded)} of "
                     f"{result.lora_keys} keys; check lists {len(said)} as skipped")
        assert set(result.not_loaded) == said
    assert len(comfy_skips(check(capsys, tmp_path / "renamed-lora_B.safetensors", "WAN_2_1_T2V", wan_model)[1])) == 6
    # lora_B without lora_A: ComfyUI v0.30.0 raises on the whole file, as check says
    code, text = check(capsys, tmp_path / "renamed-lora_A.safetensors", "WAN_2_1_T2V", wan_model)
    assert code == 1 and "ComfyUI v0.30.0 raises on this file and loads none of it" in summary(text)
    with pytest.raises(RuntimeError, match="KeyError"):
        harness.run_comfy([harness.ComfyJob("WAN_2_1_T2V", wan_base, tmp_path / "renamed-lora_A.safetensors", wan_model)])
    merged = results[-1]
    written = load_file(str(tmp_path / "merged.safetensors"))
    gap = max(((merged.weights[k].float() - written[k]).norm() / written[k].norm()).item() for k in written if written[k].norm() > 0)
    show(capsys, f"merged single file in ComfyUI's UNETLoader: {len(merged.unet_missing)} missing, "
                 f"{len(merged.unet_unexpected)} unexpected, weights vs the file {gap:.1e}")
    assert merged.unet_missing == [] and merged.unet_unexpected == [] and gap <= EQUAL
