"""A model's parts as `load_part` would load them, built from their configs with no weights: the released model's
configs that `estimate` reads (estimate/configs.py), modules made on the meta device in their load dtypes and turned
into fake CPU tensors, so the run's own code moves them to the device. Tokenizers are built locally (the real ones'
vocabularies are not on this machine): their ids fit the text encoder's table, which is all the dry run needs."""

from __future__ import annotations

import inspect
import json
import tempfile
from pathlib import Path

import torch

from ..config import TrainConfig
from ..estimate.configs import part_configs, transformer_config
from ..models.fake_memory import init_kwargs

# image encoders the released configs do not carry: WAN 2.1 I2V's CLIP ViT-H/14 vision tower, HunyuanVideo 1.5 I2V's
# SigLIP so400m-patch14-384
IMAGE_ENCODER_CONFIGS = {
    "CLIPVisionModel": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                            image_size=224, patch_size=14, projection_dim=1024, hidden_act="gelu"),
    "SiglipVisionModel": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                              image_size=384, patch_size=14),
}
# their image processors, at the size each released encoder takes (a processor class's default is not it: SigLIP's
# is 224, so its 256 patches would not match the 384 model's 729 positions)
IMAGE_PROCESSORS = {
    "SiglipImageProcessor": lambda size: dict(size={"height": size, "width": size}),
    "CLIPImageProcessor": lambda size: dict(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
}
PROCESSOR_ENCODERS = {"SiglipImageProcessor": "SiglipVisionModel", "CLIPImageProcessor": "CLIPVisionModel"}


def _processor_kind(name: str) -> str:
    """transformers hands out its PIL or fast variant under the plain name (SiglipImageProcessorPil without torchvision)."""
    return name.removesuffix("Pil").removesuffix("Fast")


def fake_parameters(module: torch.nn.Module, mode) -> torch.nn.Module:
    """Every parameter and buffer as a fake CPU tensor of its shape and dtype. The parameters are made inside the fake
    mode, so `module.to(device)` can swap them (one made outside carries a weak reference that forbids it)."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None:
                with mode:
                    sub._parameters[name] = torch.nn.Parameter(torch.empty(param.shape, dtype=param.dtype),
                                                               requires_grad=param.requires_grad)
        for name, buffer in list(sub._buffers.items()):
            if buffer is not None:
                with mode:
                    sub._buffers[name] = torch.empty(buffer.shape, dtype=buffer.dtype)
    return module


class PartBuilder:
    """Stands in for `models/loading.load_part` during a dry run (`loading.part_builder`)."""

    def __init__(self, config: TrainConfig, mode, named):
        self.config, self.mode, self.named = config, mode, named  # named(prefix, module): DeviceWatch.name_modules
        self.configs = part_configs(config)
        self.folder = Path(tempfile.mkdtemp(prefix="motiontune-check-"))

    def __call__(self, cls, source: str, subfolder: str | None, dtype: torch.dtype | None):
        name = cls.__name__
        if "Tokenizer" in name:
            return self._tokenizer(subfolder or "tokenizer")
        if _processor_kind(name) in IMAGE_PROCESSORS:
            return self._image_processor(cls, subfolder or "feature_extractor")
        if dtype is None:  # schedulers: their defaults
            return cls()
        part = subfolder or "transformer"
        with torch.device("meta"):
            module = self._module(cls, part)
        keep = getattr(cls, "_keep_in_fp32_modules", None) or []
        for param_name, param in module.named_parameters():  # diffusers keeps these in float32, as from_pretrained
            if param.is_floating_point() and not (dtype != torch.float32 and any(k in param_name.split(".") for k in keep)):
                param.data = param.data.to(dtype)
        for buffer_name, buffer in module.named_buffers():
            if buffer.is_floating_point():
                module.get_submodule(buffer_name.rpartition(".")[0])._buffers[buffer_name.rpartition(".")[2]] = buffer.to(dtype)
        module.eval()  # from_pretrained hands models over in eval mode
        fake_parameters(module, self.mode)
        self.named(part, module)
        return module

    def _module(self, cls, part: str):
        if hasattr(cls, "config_class") and issubclass(cls, torch.nn.Module) and cls.__module__.startswith("transformers"):
            local = Path(self.config.base_model_name) / part / "config.json"  # a local folder's (a tiny model's)
            cfg = self.configs.get(part) or (json.loads(local.read_text()) if local.is_file() else None) \
                or IMAGE_ENCODER_CONFIGS.get(cls.__name__)
            if cfg is None:
                raise KeyError(f"no config for the {part} part ({cls.__name__}) of {self.config.base_model_name}")
            return cls(cls.config_class(**cfg))
        if part.startswith("transformer"):
            cfg = transformer_config(self.config, part)[0]
        else:  # a part the embedded release does not describe (LTX-2's vocoder): its class's defaults
            local = Path(self.config.base_model_name) / part / "config.json"  # a local folder's own (a tiny model's vocoder)
            cfg = dict(self.configs.get(part) or ({k: v for k, v in json.loads(local.read_text()).items() if not k.startswith("_")}
                                                  if local.is_file() else {}))
            parameters = inspect.signature(cls.__init__).parameters

            def given(name):  # the config's value, else the class's default (a config embedded as `{}`: MiniMax H3's audio VAE)
                default = parameters[name].default if name in parameters else None
                return cfg.get(name) or (None if default is inspect.Parameter.empty else default)

            channels = given("z_dim") or given("latent_channels")
            for key, neutral in (("latents_mean", 0.0), ("latents_std", 1.0)):
                # a released config embedded without its latent statistics: the dry run computes no values, so
                # neutral ones of the right length do
                if key in parameters and channels and len(cfg.get(key) or []) != channels:
                    cfg[key] = [neutral] * channels
        return cls(**init_kwargs(cfg, cls))

    def _image_processor(self, cls, subfolder: str):
        """A local folder's own processor (a tiny model's); else one at the size of the released encoder."""
        local = Path(self.config.base_model_name) / subfolder
        if (local / "preprocessor_config.json").is_file():
            return cls.from_pretrained(local)
        kind = _processor_kind(cls.__name__)
        return cls(**IMAGE_PROCESSORS[kind](IMAGE_ENCODER_CONFIGS[PROCESSOR_ENCODERS[kind]]["image_size"]))

    def _tokenizer(self, subfolder: str):
        from transformers import AutoTokenizer

        from ..testing.tiny_models import build_tokenizer

        folder = self.folder / subfolder
        if not folder.is_dir():
            build_tokenizer(folder, model_max_length=4096)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        # families that prompt through a chat template (HunyuanVideo 1.5's Qwen2.5-VL): a plain one, each message's text
        tokenizer.chat_template = "{% for message in messages %}{{ message['content'] if message['content'] is string " \
                                  "else message['content'][0]['text'] }} {% endfor %}"
        return tokenizer
