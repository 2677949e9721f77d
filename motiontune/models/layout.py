"""Original (ComfyUI) module names of a transformer whose original layout fuses diffusers modules: what its
single-file checkpoints and ComfyUI LoRA keys are named after (`ModelFamily.ORIGINAL_LAYOUT`)."""

from __future__ import annotations

import re

from ..util.lazy import torch


class OriginalLayout:
    """A transformer's original (ComfyUI) layout where one original module may hold several diffusers modules, stacked
    along the output dimension in the order given (HunyuanVideo's fused q, k and v)."""

    def __init__(self, model: str, outside: dict[str, str], blocks: tuple[tuple[str, str, dict], ...],
                 swapped: tuple[str, ...] = ()):
        self.model = model  # how errors name the transformer
        self.outside = outside  # original module → its diffusers module, outside the blocks
        self.blocks = blocks  # (original blocks, diffusers blocks, original module → the diffusers modules it holds)
        self.swapped = swapped  # original modules whose two halves are the other way round (diffusers' (scale, shift))

    def original_module(self, name: str) -> tuple[str, tuple[str, ...]]:
        """A diffusers module → its original module, and the diffusers modules that one holds, in order (just `name`
        where nothing is fused)."""
        for original, diffusers_name in self.outside.items():
            if name == diffusers_name:
                return original, (name,)
        for original_blocks, blocks, table in self.blocks:
            match = re.fullmatch(rf"{re.escape(blocks)}\.(\d+)\.(.+)", name)
            if match:
                index, inner = match.groups()
                for original, parts in table.items():
                    if inner in parts:
                        return f"{original_blocks}.{index}.{original}", tuple(f"{blocks}.{index}.{p}" for p in parts)
        raise KeyError(f"{name}: not a {self.model} transformer module with an original-layout name")

    def state_dict(self, state: dict, dtype: torch.dtype) -> dict:
        """A diffusers state dict in this layout, the modules an original one holds concatenated."""
        converted = {}
        for key in state:
            name, leaf = key.rsplit(".", 1)
            original, parts = self.original_module(name)
            if f"{original}.{leaf}" in converted:  # written with its first part
                continue
            tensor = torch.cat([state[f"{part}.{leaf}"] for part in parts])
            if original in self.swapped:
                scale, shift = tensor.chunk(2)
                tensor = torch.cat([shift, scale])
            converted[f"{original}.{leaf}"] = tensor.detach().to("cpu", dtype).contiguous()
        return converted
