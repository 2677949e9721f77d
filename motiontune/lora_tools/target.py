"""The transformer a LoRA file is meant for: its family (which knows the original-layout names) and the transformer
built on the meta device from its config (a model folder's, the run's, or the released model's: no weights read)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from ..util.lazy import torch


@dataclass
class Target:
    model_type: str
    family: object  # models.base.ModelFamily
    transformer: object  # torch.nn.Module, on the meta device unless loaded for real
    part: str  # the transformer's subfolder: "transformer", or WAN 2.2 A14B's low-noise "transformer_2"
    source: str  # where its config came from, for messages
    base: str  # the config's base_model_name

    def linear(self, name: str):
        """The Linear layer `name` of the transformer, or None."""
        try:
            module = self.transformer.get_submodule(name)
        except AttributeError:
            return None
        return module if isinstance(module, torch.nn.Linear) else None

    @cached_property
    def comfy_entries(self) -> dict[str, list[str]]:
        """`diffusion_model.<original module>` → the transformer's Linear modules it holds, in its order: every
        module a LoRA may adapt, named as the family names it (`comfy_lora_key`, `comfy_lora_parts`)."""
        table: dict[str, list[str]] = {}
        for name, module in self.transformer.named_modules():
            if isinstance(module, torch.nn.Linear) and self.family.lora_may_adapt(name):
                try:
                    table.setdefault(self.family.comfy_lora_key(name), self.family.comfy_lora_parts(name))
                except KeyError:  # no original-layout name
                    continue
        return table

    def entry_shape(self, comfy_key: str) -> tuple[int, int]:
        """(rows, columns) of the original-layout weight: its parts' rows stacked."""
        parts = [self.linear(p) for p in self.comfy_entries[comfy_key]]
        return sum(p.out_features for p in parts), parts[0].in_features

    def pipeline_class(self):
        """The stock pipeline class whose `lora_state_dict` reads this family's files, or None."""
        import diffusers

        name = self.family.LORA_PIPELINE
        return getattr(diffusers, name) if name else None

    def load_real(self, dtype=None):
        """The transformer with its weights (from the base model folder), replacing the meta one."""
        import diffusers

        cls = getattr(diffusers, self.family.transformer_class_name)
        base = Path(self.base)
        kwargs = {"torch_dtype": dtype} if dtype is not None else {}
        if (base / self.part / "config.json").is_file():
            self.transformer = cls.from_pretrained(str(base), subfolder=self.part, **kwargs)
        elif (base / "config.json").is_file():
            self.transformer = cls.from_pretrained(str(base), **kwargs)
        else:
            raise FileNotFoundError(f"{self.base}: not a diffusers model folder (no {self.part}/config.json); give the "
                                    "base model's folder")
        return self.transformer.requires_grad_(False)


def part_for(path: Path) -> str:
    """WAN 2.2 A14B's files name their expert (`_low_noise`: the second transformer); any other: the transformer."""
    return "transformer_2" if Path(path).stem.endswith("_low_noise") else "transformer"


def target_for(model_type: str | None = None, config_path: str | None = None, model: str | None = None,
               part: str = "transformer") -> Target:
    """The target of `--model-type T [--model FOLDER]` or `--config run.json`."""
    import diffusers

    from ..config import TrainConfig
    from ..estimate.configs import transformer_config
    from ..models import family_for
    from ..models.fake_memory import init_kwargs, quiet

    if config_path:
        from ..configure import load_config

        config = load_config(config_path, [])
    elif model_type:
        keys = {"model_type": model_type, **({"base_model_name": model} if model else {})}
        config = TrainConfig.model_validate(keys)
    else:
        raise ValueError("say which model the file is for: --model-type T (and --model FOLDER for a model of your own "
                         "size) or --config run.json")
    with quiet():
        family = family_for(config, torch.device("cpu"))
        if not (config_path or model):  # the model type's own released model, not the schema's default base
            config = config.model_copy(update={"base_model_name": family.estimate_release("")[0]})
            family = family_for(config, torch.device("cpu"))
        if part == "transformer_2" and not getattr(family, "is_a14b", False):
            part = "transformer"
        cfg, source = transformer_config(config, part)
        cls = getattr(diffusers, family.transformer_class_name)
        with torch.device("meta"):
            transformer = cls(**init_kwargs(cfg, cls))
    return Target(config.model_type, family, transformer.requires_grad_(False), part, source, config.base_model_name)
