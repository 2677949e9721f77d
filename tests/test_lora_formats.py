"""One LoRA file for diffusers and ComfyUI: COMFY_LORA, the default for LoRA runs, for every model type; and
HunyuanVideo's fine-tune as one original-layout file.

Per model type, one tiny run (lora_alpha 3, lora_rank 4) saves its LoRA in the default format and, from the same
adapters, as DIFFUSERS_LORA. Then:
- diffusers: the default file through the stock pipeline's `load_lora_weights` (diffusers' own converter for
  original-layout names), fused, gives the transformer weights the DIFFUSERS_LORA file gives;
- ComfyUI, the real one (v0.30.0, tests/comfyui/): motiontune's COMFY_TRANSFORMER file of the base model loads with
  its UNETLoader code into the class it loads the released model with, nothing missing or unexpected (LTX-2's text
  connectors included); the default file through its LoraLoader code applies every key, and the weights change by
  what diffusers fuses from the DIFFUSERS_LORA file (HunyuanVideo 1.5 too, whose diffusers reads only that file);
- the same rule written out (W += B·A · alpha / rank of the entry; 1 without `.alpha`) on the original-layout state dict
  (the family's `single_file_state_dict`, checked here to be exactly what diffusers' single-file converter turns back
  into the model), converted back by diffusers, gives the same transformer weights again: the layout itself is right.
Negative controls: without `.alpha`, or with two fused parts swapped, the same checks fail; ComfyUI applies no key of
a DIFFUSERS_LORA file. The module runs on one test process (xdist_group): every check shares its runs, and one ComfyUI
process serves all of them.

diffusers 0.42.1's two HunyuanVideo converters split a single block's fused `linear1` at the real model's width,
3072, written into the code; the tiny model is 32 wide, so `real_width_as` swaps only that number for the tests.
"""

from __future__ import annotations

import contextlib
import functools
import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import base_config, write_config
from motiontune.cli import main
from motiontune.methods import finetune, lora
from test_lora_end_to_end import _make_clip

pytestmark = pytest.mark.xdist_group("lora_formats")

RANK, ALPHA = 4, 3  # alpha != rank: a file that loses alpha scales its update wrongly
EQUAL = 1e-6  # relative difference of fused weights that counts as equal (float32 rounding gives ~1e-8 here)
SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".alpha")  # of every key of an original-layout (ComfyUI) LoRA

# model type → tiny model, stock pipeline, transformer class, config keys
MODEL_TYPES = {
    "WAN_2_1_T2V": ("wan-2.1", "WanPipeline", "WanTransformer3DModel", {}),
    # every Linear layer, the embeddings and the CLIP image projection included (outside the blocks diffusers'
    # converter has no `.alpha`: the file folds it there)
    "WAN_2_1_I2V": ("wan-2.1-i2v", "WanImageToVideoPipeline", "WanTransformer3DModel",
                    {"layer_filter": "blocks,condition_embedder,proj_out"}),
    # both experts in one run, one file each; the boundary halfway shares the few steps between them
    "WAN_2_2_T2V_A14B": ("wan-2.2-a14b", "WanPipeline", "WanTransformer3DModel",
                         {"experts": "both", "boundary_ratio": 0.5, "timestep_shift": 1.0, "epochs": 4}),
    "WAN_2_2_TI2V_5B": ("wan-2.2-ti2v-5b", "WanPipeline", "WanTransformer3DModel", {}),
    # the presets' own: FLF2V (last frames, both CLIP embeddings), VACE (a control video beside the clip)
    "WAN_2_1_FLF2V": ("wan-2.1-flf2v", "WanImageToVideoPipeline", "WanTransformer3DModel",
                      {"last_frame_conditioning_probability": 1.0}),
    "WAN_2_1_VACE": ("wan-2.1-vace", "WanVACEPipeline", "WanVACETransformer3DModel", {}),
    "HUNYUAN_VIDEO": ("hunyuan-video", "HunyuanVideoPipeline", "HunyuanVideoTransformer3DModel",
                      {"layer_filter": "blocks"}),  # the modulation layers too
    "HI_DREAM_DEV": ("hi-dream", "HiDreamImagePipeline", "HiDreamImageTransformer2DModel",
                     {"video_config": {"max_frames": 1, "target_fps": 8.0}}),
    # 32x VAE: two latent pixels a side; 8n+1 frames (the clip has no sound: the video trains alone)
    "LTX_2": ("ltx-2", "LTX2Pipeline", "LTX2VideoTransformer3DModel",
              {"resolution": "64", "video_config": {"max_frames": 9, "target_fps": 16.0}}),
}

# checked against ComfyUI only: diffusers 0.42.1 reads no original-layout LoRA or single file of HunyuanVideo 1.5 (its
# DIFFUSERS_LORA file loads with the transformer's `load_lora_adapter`)
COMFY_ONLY = {"HUNYUAN_VIDEO_1_5": ("hunyuan-video-1.5", "HunyuanVideo15Pipeline", "HunyuanVideo15Transformer3DModel", {}),
              # MiniMax H3's pipeline is modular (no from_pretrained of this kind): its transformer reads the file
              "MINIMAX_H3": ("minimax-h3", "MiniMaxH3ModularPipeline", "MiniMaxH3Transformer3DModel",
                             {"video_config": {"max_frames": 5, "target_fps": 24.0}})}  # it generates at 24 fps
# checked against ComfyUI here (through the stock pipeline's reading of the DIFFUSERS_LORA file); tests/test_ltx2.py
# checks the default file in diffusers. LTX-2.5 is not: ComfyUI v0.30.0 has no LTX-2.5 (see
# test_comfyui_lacks_ltx_2_5 and docs/formats.md)
COMFY_ALSO = {"LTX_2_3": ("ltx-2.3", "LTX2Pipeline", "LTX2VideoTransformer3DModel",
                          {"resolution": "64", "video_config": {"max_frames": 9, "target_fps": 16.0}})}
ALL_TYPES = {**MODEL_TYPES, **COMFY_ONLY, **COMFY_ALSO}


@contextlib.contextmanager
def real_width_as(width: int | None):
    """Within: torch.split turns the split sizes (3072, 3072, 3072, rest) into (width, width, width, rest)."""
    if width is None:
        yield
        return
    split = torch.split

    def narrow(tensor, sizes, dim=0):
        if isinstance(sizes, (tuple, list)) and len(sizes) == 4 and tuple(sizes[:3]) == (3072,) * 3:
            sizes = (width, width, width, tensor.shape[dim] - 3 * width)
        return split(tensor, sizes, dim)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "split", narrow)
        yield


def hunyuan_width(model_type: str, transformer) -> int | None:
    config = transformer.config
    return config.num_attention_heads * config.attention_head_dim if model_type == "HUNYUAN_VIDEO" else None


@contextlib.contextmanager
def also_saved_as(method, output_format: str, where):
    """While training: each save of `method` also writes `output_format`, from the same weights, to `where(destination)`."""
    save = method.save

    def save_both(family, config, destination, *args, **kwargs):
        paths = save(family, config, destination, *args, **kwargs)
        save(family, config, where(Path(destination)), output_format)
        return paths

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(method, "save", save_both)
        yield


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    clip = _make_clip(tmp_path_factory.mktemp("lora-formats") / "data", 32)
    shutil.copy(clip, clip.with_name("shapes-control.mp4"))  # VACE's control video (a condition the others ignore)
    return clip.parent


@pytest.fixture(scope="module")
def runs(tiny_models, clip_folder, tmp_path_factory):
    """model type → (tiny model folder, {expert label: (default file, DIFFUSERS_LORA file)}); each model type
    trains once, on first use."""
    done = {}

    def get(model_type: str):
        if model_type not in done:
            tiny, _, _, keys = ALL_TYPES[model_type]
            model, folder = tiny_models(tiny), tmp_path_factory.mktemp(model_type.lower())
            config = base_config(folder, model, clip_folder, **{
                "model_type": model_type, "epochs": 2, "learning_rate": 1e-2, "lora_rank": RANK, "lora_alpha": ALPHA,
                "video_config": {"max_frames": 5, "target_fps": 16.0}, **keys})
            assert "output_model_format" not in config  # the default format is what is checked
            with also_saved_as(lora, "DIFFUSERS_LORA", lambda path: path.with_name(f"{path.stem}-diffusers{path.suffix}")):
                assert main(["train", "--config", str(write_config(folder / "config.json", **config))]) == 0
            labels = ("high_noise", "low_noise") if model_type == "WAN_2_2_T2V_A14B" else ("",)
            tail = {label: f"_{label}.safetensors" if label else ".safetensors" for label in labels}  # lora.output_paths
            files = {label: (folder / f"lora{tail[label]}", folder / f"lora-diffusers{tail[label]}") for label in labels}
            done[model_type] = (model, files)
        return done[model_type]

    return get


def pipeline_class(model_type: str):
    import diffusers

    return getattr(diffusers, ALL_TYPES[model_type][1])


def transformer_class(model_type: str):
    import diffusers

    return getattr(diffusers, ALL_TYPES[model_type][2])


def stock_pipeline(model_type: str, model: Path):
    """The stock pipeline with its transformer(s) and scheduler; the encoders, which LoRAs here do not touch, left out."""
    parts = json.loads((model / "model_index.json").read_text())
    unused = {name: None for name, part in parts.items() if isinstance(part, list) and name != "scheduler"
              and not name.startswith("transformer")}
    return pipeline_class(model_type).from_pretrained(model, **unused)


def fused_weights(model_type: str, model: Path, files: dict[str, Path]) -> dict[str, dict[str, torch.Tensor]]:
    """Each transformer's weights after `load_lora_weights` of `files` (expert label → file) and `fuse_lora`."""
    if model_type in COMFY_ONLY:  # the transformer's own reader (its pipeline has none)
        transformer = transformer_class(model_type).from_pretrained(model, subfolder="transformer")
        # the folder and the name: given the file's path, diffusers 0.42.1 skips its metadata, where alpha is
        transformer.load_lora_adapter(str(files[""].parent), weight_name=files[""].name, prefix="transformer")
        transformer.fuse_lora()
        return {"transformer": plain_weights(transformer)}
    pipe = stock_pipeline(model_type, model)
    components = []
    with real_width_as(hunyuan_width(model_type, pipe.transformer)):
        for label, path in files.items():
            low_noise = label == "low_noise"  # WAN 2.2 A14B's second expert
            pipe.load_lora_weights(str(path), **({"load_into_transformer_2": True} if low_noise else {}))
            components.append("transformer_2" if low_noise else "transformer")
    pipe.fuse_lora(components=components)
    return {name: plain_weights(getattr(pipe, name)) for name in components}


@functools.cache
def _fused_once(model_type: str, model: Path, files: tuple[tuple[str, Path], ...]) -> dict[str, dict[str, torch.Tensor]]:
    return fused_weights(model_type, model, dict(files))


def reference_weights(model_type: str, model: Path, files: dict) -> dict[str, dict[str, torch.Tensor]]:
    """The weights the DIFFUSERS_LORA files of `files` give in diffusers; made once per run (read, do not change)."""
    return _fused_once(model_type, model, tuple((label, pair[1]) for label, pair in files.items()))


def plain_weights(transformer) -> dict[str, torch.Tensor]:
    """The model's weights under their own names, without LoRA matrices (fused ones live in `base_layer`)."""
    return {k.replace(".base_layer", ""): v.detach().clone() for k, v in transformer.state_dict().items() if ".lora_" not in k}


def relative_difference(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    assert sorted(ours) == sorted(reference)
    return max(((ours[k] - reference[k]).norm() / reference[k].norm()).item() for k in reference)


def diffusers_gap(model_type: str, model: Path, files: dict, default_files: dict | None = None) -> tuple[float, float]:
    """(the largest relative difference between the weights from the default files and from the DIFFUSERS_LORA ones,
    the largest relative change the DIFFUSERS_LORA files make to a weight)."""
    default = fused_weights(model_type, model, default_files or {label: pair[0] for label, pair in files.items()})
    reference = reference_weights(model_type, model, files)
    base = stock_pipeline(model_type, model)
    gap = max(relative_difference(default[name], reference[name]) for name in reference)
    change = min(relative_difference(reference[name], plain_weights(getattr(base, name))) for name in reference)
    return gap, change


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_default_lora_in_diffusers_equals_the_diffusers_lora(model_type, runs):
    model, files = runs(model_type)
    gap, change = diffusers_gap(model_type, model, files)
    print(f"{model_type}: fused weights, default file vs DIFFUSERS_LORA: max relative difference {gap:.2e} "
          f"(largest relative change the LoRA makes to a weight: {change:.2e}; of two experts, the smaller)")
    assert change > 1e-3  # the LoRA trained (each expert's): a wrong scale could not hide under rounding
    assert gap <= EQUAL


def original_layout(model_type: str, model: Path, expert: str):
    """(the stock transformer, its original-layout state dict by the family, diffusers' single-file converter:
    the function `from_single_file` reads a file with)."""
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES

    from motiontune.config import TrainConfig
    from motiontune.models import family_for

    family = family_for(TrainConfig.model_validate({"model_type": model_type, "base_model_name": str(model)}), torch.device("cpu"))
    transformer = transformer_class(model_type).from_pretrained(model, subfolder=expert)
    convert = SINGLE_FILE_LOADABLE_CLASSES[MODEL_TYPES[model_type][2]]["checkpoint_mapping_fn"]
    return transformer, family.single_file_state_dict(transformer, torch.float32), convert


# original names diffusers 0.42.1's single-file converter passes through unchanged (FLF2V's image positions, which
# ComfyUI and the original WAN code read under this name): named here as the model names them
CONVERTER_LEAVES = {"img_emb.emb_pos": "condition_embedder.image_embedder.pos_embed"}


def _named(state: dict) -> dict:
    return {CONVERTER_LEAVES.get(k, k): v for k, v in state.items()}


def comfy_applied(model_type: str, model: Path, expert: str, path: Path) -> tuple[dict, dict]:
    """(the stock transformer's weights, those weights with the file applied as ComfyUI applies it to the
    original layout, converted back by diffusers). Asserts every key names an original weight with its shape."""
    transformer, original, convert = original_layout(model_type, model, expert)
    width = hunyuan_width(model_type, transformer)
    stock = plain_weights(transformer)
    with real_width_as(width):  # our original layout is exactly what diffusers' converter turns back into the model
        back = _named(convert(dict(original)))
    assert sorted(back) == sorted(stock) and all(torch.equal(back[k], stock[k]) for k in stock)

    entries = load_file(str(path))
    assert all(k.endswith(SUFFIXES) for k in entries)
    modules = {k.removesuffix(s) for k in entries for s in SUFFIXES if k.endswith(s)}
    for module in sorted(modules):
        assert module.startswith("diffusion_model."), module
        weight = original.get(module.removeprefix("diffusion_model.") + ".weight")
        assert weight is not None, f"{module}: no such weight in the original layout"
        down, up = entries[f"{module}.lora_A.weight"], entries[f"{module}.lora_B.weight"]
        assert down.shape[1] == weight.shape[1] and up.shape[0] == weight.shape[0] and down.shape[0] == up.shape[1], module
        alpha = entries.get(f"{module}.alpha")
        scale = 1.0 if alpha is None else alpha.item() / down.shape[0]
        original[module.removeprefix("diffusion_model.") + ".weight"] = weight + scale * (up @ down)
    with real_width_as(width):
        return stock, _named(convert(original))



@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_default_lora_names_original_layout_weights_and_applies_as_in_diffusers(model_type, runs):
    model, files = runs(model_type)
    for label, (default, _) in files.items():
        expert = "transformer_2" if label == "low_noise" else "transformer"
        _, comfy = comfy_applied(model_type, model, expert, default)
        reference = reference_weights(model_type, model, files)[expert]
        gap = relative_difference(comfy, reference)
        print(f"{model_type} {label or ''}: ComfyUI's way on the original layout vs DIFFUSERS_LORA in diffusers: {gap:.2e}")
        assert gap <= EQUAL


def test_alpha_is_written_where_diffusers_reads_it_and_folded_elsewhere(runs):
    _, files = runs("WAN_2_1_I2V")
    wan = load_file(str(files[""][0]))
    assert wan["diffusion_model.blocks.0.cross_attn.k_img.alpha"].item() == ALPHA
    assert "diffusion_model.img_emb.proj.1.lora_A.weight" in wan and "diffusion_model.img_emb.proj.1.alpha" not in wan
    _, files = runs("HUNYUAN_VIDEO")
    hunyuan = load_file(str(files[""][0]))  # the tiny model: 32 wide, MLP 128
    assert not any(k.endswith(".alpha") for k in hunyuan)
    assert hunyuan["diffusion_model.double_blocks.0.img_attn_qkv.lora_A.weight"].shape == (3 * RANK, 32)
    assert hunyuan["diffusion_model.single_blocks.0.linear1.lora_B.weight"].shape == (3 * 32 + 128, 4 * RANK)
    assert "diffusion_model.double_blocks.0.img_mod.linear.lora_A.weight" in hunyuan


def test_negative_controls_fail_the_checks(runs, tmp_path):
    """Dropping `.alpha` (WAN), or swapping the q and k parts of a fused entry (HunyuanVideo), fails both checks."""
    model, files = runs("WAN_2_1_T2V")
    entries = load_file(str(files[""][0]))
    save_file({k: v for k, v in entries.items() if not k.endswith(".alpha")}, str(tmp_path / "no-alpha.safetensors"))
    gap, _ = diffusers_gap("WAN_2_1_T2V", model, files, {"": tmp_path / "no-alpha.safetensors"})
    _, comfy = comfy_applied("WAN_2_1_T2V", model, "transformer", tmp_path / "no-alpha.safetensors")
    comfy_gap = relative_difference(comfy, reference_weights("WAN_2_1_T2V", model, files)["transformer"])
    print(f"WAN 2.1 without .alpha: diffusers {gap:.2e}, ComfyUI's way {comfy_gap:.2e}")
    assert gap > 1e3 * EQUAL and comfy_gap > 1e3 * EQUAL

    model, files = runs("HUNYUAN_VIDEO")
    entries = load_file(str(files[""][0]))
    key = "diffusion_model.double_blocks.0.img_attn_qkv.lora_B.weight"
    q, k, v = entries[key].chunk(3)
    entries[key] = torch.cat([k, q, v])
    save_file(entries, str(tmp_path / "swapped.safetensors"))
    gap, _ = diffusers_gap("HUNYUAN_VIDEO", model, files, {"": tmp_path / "swapped.safetensors"})
    _, comfy = comfy_applied("HUNYUAN_VIDEO", model, "transformer", tmp_path / "swapped.safetensors")
    comfy_gap = relative_difference(comfy, reference_weights("HUNYUAN_VIDEO", model, files)["transformer"])
    print(f"HunyuanVideo with q and k swapped: diffusers {gap:.2e}, ComfyUI's way {comfy_gap:.2e}")
    assert gap > 1e3 * EQUAL and comfy_gap > 1e3 * EQUAL


def test_hunyuan_fused_entry_with_some_parts_adapted(tiny_models, tmp_path):
    """A layer_filter that adapts only some parts of a fused module: the others get zero rows, in both readers."""
    from motiontune.config import TrainConfig
    from motiontune.models import family_for

    model = tiny_models("hunyuan-video")
    config = TrainConfig.model_validate({"model_type": "HUNYUAN_VIDEO", "base_model_name": str(model), "lora_rank": RANK,
                                         "lora_alpha": ALPHA, "layer_filter": "attn.to_k,add_v_proj,proj_mlp"})
    family = family_for(config, torch.device("cpu"))
    family.load_transformers()
    expert = family.trained_experts()[0]
    torch.manual_seed(0)
    for parameter in lora.prepare(family, expert, config):
        parameter.data.normal_(std=0.3)  # as if trained: B is no longer zero
    files = {"": (tmp_path / "lora.safetensors", tmp_path / "lora-diffusers.safetensors")}
    lora.save(family, config, files[""][0], "COMFY_LORA")
    lora.save(family, config, files[""][1], "DIFFUSERS_LORA")
    entries = load_file(str(files[""][0]))
    assert entries["diffusion_model.single_blocks.0.linear1.lora_A.weight"].shape[0] == 2 * RANK  # k and the MLP input

    gap, change = diffusers_gap("HUNYUAN_VIDEO", model, files)
    stock, comfy = comfy_applied("HUNYUAN_VIDEO", model, "transformer", files[""][0])
    comfy_gap = relative_difference(comfy, reference_weights("HUNYUAN_VIDEO", model, files)["transformer"])
    print(f"HunyuanVideo, some parts adapted: diffusers {gap:.2e}, ComfyUI's way {comfy_gap:.2e} (change {change:.2e})")
    assert change > 1e-3 and gap <= EQUAL and comfy_gap <= EQUAL
    assert torch.equal(comfy["single_transformer_blocks.0.attn.to_q.weight"], stock["single_transformer_blocks.0.attn.to_q.weight"])


def test_hunyuan_fine_tune_as_one_original_layout_file_loads_back_bit_for_bit(tiny_models, clip_folder, tmp_path):
    """COMFY_TRANSFORMER for HunyuanVideo: the original layout, which `from_single_file` reads back into exactly the
    weights the same run saved as a diffusers folder."""
    from diffusers import HunyuanVideoTransformer3DModel

    model = tiny_models("hunyuan-video")
    config = base_config(tmp_path, model, clip_folder, model_type="HUNYUAN_VIDEO", training_method="FINE_TUNE",
                         output_model_format="COMFY_TRANSFORMER", output_model_destination=str(tmp_path / "tuned.safetensors"),
                         epochs=1, learning_rate=1e-3, video_config={"max_frames": 5, "target_fps": 16.0})
    with also_saved_as(finetune, "DIFFUSERS", lambda path: path.with_name("tuned-folder")):
        assert main(["train", "--config", str(write_config(tmp_path / "config.json", **config))]) == 0
    folder = HunyuanVideoTransformer3DModel.from_pretrained(tmp_path / "tuned-folder").state_dict()
    stock = HunyuanVideoTransformer3DModel.from_pretrained(model, subfolder="transformer")
    with real_width_as(hunyuan_width("HUNYUAN_VIDEO", stock)):
        single = HunyuanVideoTransformer3DModel.from_single_file(str(tmp_path / "tuned.safetensors"), config=str(model),
                                                                  subfolder="transformer").state_dict()
    assert sorted(single) == sorted(folder)
    assert all(torch.equal(single[k], folder[k]) for k in folder)
    assert not torch.equal(folder["proj_out.weight"], stock.state_dict()["proj_out.weight"])  # it trained
    original = load_file(str(tmp_path / "tuned.safetensors"))
    assert original["double_blocks.0.img_attn_qkv.weight"].shape == (3 * 32, 32)
    assert original["single_blocks.0.linear1.weight"].shape == (3 * 32 + 128, 32)


# --- the real ComfyUI (v0.30.0, tests/comfyui/): its UNETLoader and LoraLoader on the same files ---------------------

def family_of(model_type: str, model: Path, **keys):
    from motiontune.config import TrainConfig
    from motiontune.models import family_for

    config = TrainConfig.model_validate({"model_type": model_type, "base_model_name": str(model), "train_dtype": "FLOAT_32",
                                         **keys})
    return family_for(config, torch.device("cpu")), config


def comfy_transformer_files(model_type: str, model: Path, folder: Path) -> dict[str, Path]:
    """The tiny base model saved by motiontune as COMFY_TRANSFORMER (the FINE_TUNE save path): expert label → file."""
    keys = {"experts": "both"} if model_type == "WAN_2_2_T2V_A14B" else {}
    family, config = family_of(model_type, model, training_method="FINE_TUNE", output_model_format="COMFY_TRANSFORMER",
                               **keys)
    family.load_transformers()
    labels = [expert.label for expert in family.trained_experts()]
    return dict(zip(labels, finetune.save(family, config, folder / "base.safetensors")))


@pytest.fixture(scope="module")
def comfy(runs, tiny_models, tmp_path_factory):
    """Every model type through ComfyUI in one process: (model type, expert label) → (its COMFY_TRANSFORMER base file,
    ComfyUI's result for the base alone, for the base with the default LoRA file)."""
    from comfyui.harness import ComfyJob, run_comfy

    jobs, keys = [], []
    for model_type in ALL_TYPES:
        model, files = runs(model_type)
        bases = comfy_transformer_files(model_type, model, tmp_path_factory.mktemp(f"comfy-{model_type.lower()}"))
        for label, (default, _) in files.items():
            jobs += [ComfyJob(model_type, bases[label], None, model), ComfyJob(model_type, bases[label], default, model)]
            keys.append((model_type, label, bases[label]))
    # negative controls: WAN 2.1's default file without its `.alpha` keys, and its DIFFUSERS_LORA file
    model, files = runs("WAN_2_1_T2V")
    default, diffusers_file = files[""]
    no_alpha = tmp_path_factory.mktemp("comfy-controls") / "no-alpha.safetensors"
    save_file({k: v for k, v in load_file(str(default)).items() if not k.endswith(".alpha")}, str(no_alpha))
    base = next(base for model_type, _, base in keys if model_type == "WAN_2_1_T2V")
    jobs += [ComfyJob("WAN_2_1_T2V", base, no_alpha, model), ComfyJob("WAN_2_1_T2V", base, diffusers_file, model)]
    # LTX-2.5's base model alone, read as ComfyUI reads LTX models (its LTX-2.3 sizes and options)
    ltx25 = tiny_models("ltx-2.5")
    ltx25_base = comfy_transformer_files("LTX_2_5", ltx25, tmp_path_factory.mktemp("comfy-ltx_2_5"))[""]
    jobs.append(ComfyJob("LTX_2_3", ltx25_base, None, ltx25))
    started = time.monotonic()
    results = run_comfy(jobs)
    print(f"\nComfyUI: {len(jobs)} loads in one process, {time.monotonic() - started:.1f} s")
    found = {(model_type, label): (base, results[2 * i], results[2 * i + 1]) for i, (model_type, label, base) in enumerate(keys)}
    found["controls"] = (base, results[-3], results[-2])
    found["LTX_2_5"] = (ltx25_base, results[-1], None)
    return found


def comfy_delta_gap(model_type: str, model: Path, files: dict, label: str, base: Path, result) -> tuple[float, int]:
    """(the largest relative difference between ComfyUI's weight deltas and diffusers' (the DIFFUSERS_LORA file fused
    by the stock pipeline), both in the original layout; how many weights changed). Asserts both change the same
    weights."""
    expert = "transformer_2" if label == "low_noise" else "transformer"
    family, _ = family_of(model_type, model)
    module = transformer_class(model_type).from_pretrained(model, subfolder=expert)  # its buffers (MiniMax H3's rotary table)
    reference = family.single_file_state_dict(module, torch.float32, reference_weights(model_type, model, files)[expert])
    stock = load_file(str(base))
    theirs = {k: reference[k] - stock[k] for k in stock if not torch.equal(reference[k], stock[k])}
    ours = result.deltas(stock)
    assert set(theirs) <= set(ours), sorted(set(theirs) - set(ours))[:5]  # every weight diffusers changes is patched
    # patched by a zero update (a HiDream MoE expert no token was routed to kept lora_B = 0), as in diffusers
    assert all(ours[k].abs().max() == 0 for k in set(ours) - set(theirs)), sorted(set(ours) - set(theirs))[:5]
    return max(((ours[k] - theirs[k]).norm() / theirs[k].norm()).item() for k in theirs), len(theirs)


COMFY_CASES = [(t, "high_noise") for t in ALL_TYPES if t == "WAN_2_2_T2V_A14B"] + [
    (t, "low_noise" if t == "WAN_2_2_T2V_A14B" else "") for t in ALL_TYPES]


@pytest.mark.parametrize("model_type,label", COMFY_CASES)
def test_comfyui_applies_every_key_of_the_default_lora_as_diffusers_does(model_type, label, runs, comfy):
    """ComfyUI's own loaders: the COMFY_TRANSFORMER base file loads with no missing or unexpected weight, into the
    class ComfyUI loads the released model with; every tensor of the default LoRA file is applied (no "lora key not
    loaded"); and the weights change by what diffusers' stock pipeline fuses from the DIFFUSERS_LORA file."""
    from comfyui.harness import COMFY_MODELS

    model, files = runs(model_type)
    base, alone, with_lora = comfy[(model_type, label)]
    gap, changed = comfy_delta_gap(model_type, model, files, label, base, with_lora)
    print(f"{model_type} {label}: ComfyUI {with_lora.model_class} ({with_lora.image_model}); base: "
          f"{len(alone.unet_missing)} missing, {len(alone.unet_unexpected)} unexpected; LoRA: {with_lora.lora_keys} "
          f"tensors, {len(with_lora.not_loaded)} not loaded, {changed} weights changed; deltas vs diffusers' "
          f"{gap:.2e} relative")
    assert alone.model_class == COMFY_MODELS[model_type].comfy_class
    assert alone.unet_missing == [] and alone.unet_unexpected == []
    assert with_lora.not_loaded == [] and with_lora.lora_keys > 0
    assert gap <= 1e-5


def test_comfyui_checks_fail_on_a_broken_file(runs, comfy):
    """Negative controls through the same ComfyUI process: the default file without `.alpha` changes the weights by the
    wrong amount; a DIFFUSERS_LORA file (diffusers' names) is not applied by ComfyUI at all."""
    model, files = runs("WAN_2_1_T2V")
    base, no_alpha, diffusers_names = comfy["controls"]
    gap, _ = comfy_delta_gap("WAN_2_1_T2V", model, files, "", base, no_alpha)
    print(f"WAN 2.1 in ComfyUI, without .alpha: deltas vs diffusers' {gap:.2e}; DIFFUSERS_LORA file: "
          f"{len(diffusers_names.not_loaded)}/{diffusers_names.lora_keys} keys not loaded")
    assert no_alpha.not_loaded == [] and gap > 1e-2
    assert len(diffusers_names.not_loaded) == diffusers_names.lora_keys > 0 and diffusers_names.weights == {}


def test_comfyui_loads_the_ltx2_text_connectors_from_the_comfy_transformer_file(runs, comfy):
    """ComfyUI's LTX-2 model holds the video and audio text connectors (diffusers keeps them in the pipeline's
    `connectors`): the COMFY_TRANSFORMER file carries them, and ComfyUI loads exactly the base model's."""
    from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors

    from motiontune.models.ltx2 import original_connector_name

    model, _ = runs("LTX_2")
    _, alone, _ = comfy[("LTX_2", "")]
    connectors = LTX2TextConnectors.from_pretrained(model, subfolder="connectors").state_dict()
    expected = {original_connector_name(k): v for k, v in connectors.items() if not k.startswith("text_proj_in.")}
    loaded = {k: v for k, v in alone.weights.items() if "_embeddings_connector." in k}
    print(f"LTX-2 in ComfyUI: {len(loaded)} connector tensors loaded, {len(alone.unet_missing)} missing")
    assert alone.unet_missing == [] and len(expected) == 30  # the tiny model's: 15 a connector
    assert sorted(loaded) == sorted(expected) and all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_comfyui_lacks_ltx_2_5(comfy):
    """ComfyUI v0.30.0 builds every LTX feed-forward with biases and has no keyframe position embedding, so it cannot
    hold LTX-2.5 (bias-free video feed-forward, `keyframes_abs_pos_embedding`): its loader reports exactly those, and
    would run with uninitialised biases. docs/formats.md says so; this fails when a ComfyUI that has LTX-2.5 is pinned."""
    _, alone, _ = comfy["LTX_2_5"]
    print(f"LTX-2.5 in ComfyUI v0.30.0: missing {alone.unet_missing}, unexpected {alone.unet_unexpected}")
    assert alone.unet_missing and all(k.startswith("transformer_blocks.") and k.endswith(("ff.net.0.proj.bias", "ff.net.2.bias"))
                                      for k in alone.unet_missing)
    assert alone.unet_unexpected == ["keyframes_abs_pos_embedding"]
