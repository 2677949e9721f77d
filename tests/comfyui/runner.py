"""Runs inside the ComfyUI venv (.venv-comfy), never under motiontune's: loads model files and LoRAs with ComfyUI's own
code, as a user's UNETLoader and LoraLoaderModelOnly nodes do, and writes what came out for the tests to read.

    .venv-comfy/bin/python tests/comfyui/runner.py JOBS.json

JOBS.json: {"comfyui": ComfyUI's folder, "jobs": [job, ...]}. A job:
    base         the diffusion model file (one original-layout safetensors file)
    lora         a LoRA file to apply at strength 1, or null to load the base alone
    out          where to write the result: OUT.json (what ComfyUI said) and OUT.safetensors (weights)
    unet_config  values laid over what ComfyUI's detection reads from the file (a tiny model's head count: ComfyUI
                 derives it from widths, assuming the released models' 128-wide heads)
    arguments    constructor arguments by "module:name", for sizes no config reaches (ComfyUI builds LTX-2's
                 connectors with the released 128 registers and WAN's image projection 1280 wide, whatever the file)
    model_class  the supported_models class to build, where a tiny model's widths cannot match the released ones
                 that select it (HunyuanVideo 1.5's vision_in_dim 1152, for one); null: ComfyUI's own choice
OUT.safetensors holds, under the base file's own key names, every weight the LoRA patched, as ComfyUI's model patcher
computes it (`patch_weight_to_device`, the routine that patches weights when a model loads); for a job without a
LoRA, every weight of the loaded model whose name is one of the file's.
"""

from __future__ import annotations

import ast
import inspect
import importlib
import importlib.abc
import importlib.machinery
import json
import logging
import sys
import types


class _NotInstalled(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """torchvision and torchaudio as empty modules. ComfyUI imports both at the top of models these tests never build
    (Stable Cascade, the LTX audio VAE, ...); PyPI has no CPU build of either for the pinned torch (their wheels there
    need CUDA's libraries), and loading a diffusion model or a LoRA uses neither. Any use fails loudly."""

    ROOTS = ("torchvision", "torchaudio")

    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] in self.ROOTS:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []

        def missing(attribute, name=spec.name):
            raise AttributeError(f"{name}.{attribute}: not installed in the ComfyUI test venv")

        module.__getattr__ = missing
        return module

    def exec_module(self, module):
        pass


class _Messages(logging.Handler):
    """Every warning and error ComfyUI logs, in order."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _listed(messages: list[str], prefix: str) -> list[str]:
    """The keys of ComfyUI's "unet missing: [...]"-style messages."""
    keys = []
    for line in messages:
        if line.startswith(prefix):
            keys.extend(ast.literal_eval(line[len(prefix):].strip()))
    return keys


def _with_arguments(cls, arguments: dict):
    """`cls`, built with `arguments` whatever its caller passes for them (by position or by name)."""
    signature = inspect.signature(cls)

    def build(*args, **kwargs):
        bound = signature.bind_partial(*args, **kwargs)
        bound.arguments.update(arguments)
        return cls(*bound.args, **bound.kwargs)

    return build


def import_comfy(folder: str):
    sys.path.insert(0, folder)
    sys.meta_path.insert(0, _NotInstalled())
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # read when comfy.model_management is first imported
    import comfy.lora
    import comfy.model_detection
    import comfy.sd
    import comfy.supported_models
    import comfy.utils

    return comfy


def run(comfy, job: dict, messages: _Messages) -> None:
    import torch
    from safetensors.torch import save_file

    detected = {}
    detect, choose = comfy.model_detection.detect_unet_config, comfy.model_detection.model_config_from_unet_config

    def detect_with_overrides(*args, **kwargs):
        config = detect(*args, **kwargs)
        if config is not None:
            detected.update(config)
            config.update(job.get("unet_config") or {})
        return config

    def choose_class(unet_config, *args, **kwargs):
        if job.get("model_class"):
            return getattr(comfy.supported_models, job["model_class"])(unet_config)
        return choose(unet_config, *args, **kwargs)

    replaced = []
    for target, arguments in (job.get("arguments") or {}).items():
        module_name, name = target.split(":")
        module = importlib.import_module(module_name)
        replaced.append((module, name, getattr(module, name)))
        setattr(module, name, _with_arguments(getattr(module, name), arguments))

    messages.lines.clear()
    comfy.model_detection.detect_unet_config = detect_with_overrides
    comfy.model_detection.model_config_from_unet_config = choose_class
    try:
        model = comfy.sd.load_diffusion_model(job["base"])  # what UNETLoader calls (nodes.py)
    finally:
        comfy.model_detection.detect_unet_config, comfy.model_detection.model_config_from_unet_config = detect, choose
        for module, name, original in replaced:
            setattr(module, name, original)
    load_messages = list(messages.lines)
    file_keys = list(comfy.utils.load_torch_file(job["base"]).keys())
    # the model's own name of each file key → that key (HunyuanVideo's loader renames some: `_mod.linear.` → `_mod.lin.`)
    config = model.model.model_config
    file_name = {k: v for k, v in config.process_unet_state_dict({k: k for k in file_keys}).items() if isinstance(v, str)}
    result = {
        "model_class": type(config).__name__,
        "image_model": detected.get("image_model"),
        "detected": {k: v for k, v in detected.items() if isinstance(v, (int, float, str, bool, type(None)))},
        "unet_missing": _listed(load_messages, "unet missing:"),
        "unet_unexpected": _listed(load_messages, "unet unexpected:"),
        "load_messages": load_messages,
    }
    weights = {}
    if job.get("lora"):
        messages.lines.clear()
        lora, metadata = comfy.utils.load_torch_file(job["lora"], safe_load=True, return_metadata=True)
        # LoraLoaderModelOnly (nodes.py): the model alone, at strength 1
        patched, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0, lora_metadata=metadata)
        result["lora_messages"] = list(messages.lines)
        result["not_loaded"] = [line.split(":", 1)[1].strip() if ":" in line else line.split(" ", 2)[2]
                                for line in messages.lines if line.startswith(("lora key not loaded", "NOT LOADED"))]
        result["lora_keys"] = len(lora)
        for key in patched.patches:
            weight = patched.patch_weight_to_device(key, device_to=torch.device("cpu"), return_weight=True)
            weights[file_name.get(key.removeprefix("diffusion_model."), key)] = weight.detach().float().contiguous()
    else:
        state = model.model.diffusion_model.state_dict()
        weights = {name: state[key].detach().float().contiguous() for key, name in file_name.items() if key in state}
    result["patched"] = len(weights) if job.get("lora") else 0
    save_file(weights, job["out"] + ".safetensors")
    with open(job["out"] + ".json", "w") as f:
        json.dump(result, f, indent=1)


def main(path: str) -> int:
    with open(path) as f:
        request = json.load(f)
    messages = _Messages()
    logging.getLogger().addHandler(messages)
    logging.getLogger().setLevel(logging.INFO)
    comfy = import_comfy(request["comfyui"])
    for job in request["jobs"]:
        run(comfy, job, messages)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
