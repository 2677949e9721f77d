"""`motiontune lora check`: which keys of a LoRA file each loader takes.

diffusers: each module's keys go through the stock pipeline's own `lora_state_dict` (its converter of original-layout
names) alone, which says what that module becomes or why it is refused; the whole file's conversion is then injected by
peft, through the transformer's own `load_lora_adapter`, into the transformer built on the meta device from its config;
a key loads when what it became is an adapter weight peft made. ComfyUI: a key loads when it names, with a suffix its
LoRA adapters read, a module of the original layout (the family's `comfy_lora_key` over every module a LoRA may adapt)
with the weight's shape."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from .lora_file import COMFY_PREFIX, DIFFUSERS_PREFIX, Entry, LoraFile, as_meta
from .target import Target

# the suffixes ComfyUI's weight adapters read (comfy/weight_adapter: lora.py, loha.py, lokr.py; `diff` in comfy/lora.py)
COMFY_SUFFIXES = {
    "LoRA": {"lora_A.weight", "lora_B.weight", "lora_up.weight", "lora_down.weight", "lora_mid.weight", "alpha"},
    "DoRA": {"lora_A.weight", "lora_B.weight", "lora_up.weight", "lora_down.weight", "alpha", "dora_scale"},
    "LoHa": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha", "dora_scale"},
    "LoKr": {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha", "dora_scale"},
}
CHECK_ADAPTER = "motiontune_check"
MODALITIES = ("video", "audio", "text encoder")


@dataclass
class LoaderVerdict:
    """One loader on one file: whether it is meant to read it, and the keys it would skip (key → why)."""

    name: str
    applies: bool
    note: str = ""  # why it does not apply, or what refuses the whole file
    skipped: dict[str, str] = field(default_factory=dict)
    not_checked: set[str] = field(default_factory=set)

    def summary(self, total: int) -> str:
        if not self.applies:
            return f"{self.name}: not its format ({self.note})"
        checked = total - len(self.not_checked)
        text = (f"{self.name}: all keys load ({checked}/{checked})" if not self.skipped
                else f"{self.name}: skips {len(self.skipped)} of {checked} keys")
        if self.note:
            text += f"; {self.note}"
        if self.not_checked:
            text += f" ({len(self.not_checked)} text-encoder keys not checked)"
        return text


@dataclass
class CheckReport:
    lora: LoraFile
    target: Target
    loaders: list[LoaderVerdict]

    @property
    def ok(self) -> bool:
        """No loader meant for this file skips a key."""
        return not any(loader.applies and loader.skipped for loader in self.loaders)


def _quiet_diffusers():
    """diffusers' warnings about the keys it drops are what this check reports, per key."""
    from ..models.fake_memory import quiet

    return quiet("diffusers", logging.CRITICAL)


SHAPE_MISMATCHES = ("does not fit", "its update is")


def check(lora: LoraFile, target: Target) -> CheckReport:
    loaders = [diffusers_verdict(lora, target), comfy_verdict(lora, target)]
    for loader in loaders:
        if loader.skipped and all(any(m in r for m in SHAPE_MISMATCHES) for r in loader.skipped.values()):
            hint = (f"every key it skips has another shape: is the file for another size of {target.family.NAME} "
                    f"than {target.source}? Give that model with --model FOLDER")
            loader.note = f"{loader.note}; {hint}" if loader.note else hint
    return CheckReport(lora, target, loaders)


# --- diffusers ------------------------------------------------------------------------------------------------------
def diffusers_verdict(lora: LoraFile, target: Target) -> LoaderVerdict:
    kinds, layout = lora.kinds(), lora.layout
    pipeline = target.pipeline_class()
    if "LoHa" in kinds:
        return LoaderVerdict("diffusers", False, "diffusers reads no LoHa: load the DIFFUSERS_LORA file with peft, "
                                                 "docs/formats.md")
    if layout != "DIFFUSERS_LORA" and pipeline is None:
        return LoaderVerdict("diffusers", False, f"diffusers has no reader of this layout for {target.family.NAME}: "
                                                 "`motiontune lora convert` it --to DIFFUSERS_LORA")
    if layout == "COMFY_LORA" and kinds & {"DoRA", "LoKr"}:
        return LoaderVerdict("diffusers", False, "diffusers' converters read original-layout LoRA names only: a "
                                                 "ComfyUI DoRA or LoKr file is for ComfyUI, the DIFFUSERS_LORA one for diffusers")
    verdict = LoaderVerdict("diffusers", True)
    entries = lora.entries()
    keys_of = {module: [_key(module, s) for s in entry.tensors] for module, entry in entries.items()}
    whole, error = _convert(pipeline, lora.tensors, keep=True)
    if error:  # the stock loader raises on this file: it loads nothing. Which entries make it raise?
        return _refused_file(verdict, error, lora, target, pipeline, keys_of)
    # what each entry becomes: the keys the whole file's conversion loses without it (the converters look at the
    # whole file to tell its layout, so an entry is converted among the others)
    became: dict[str, list[str]] = {}
    for module in entries:
        rest, rest_error = _convert(pipeline, _tensors(lora, keys_of, [m for m in entries if m != module]))
        became[module] = list(whole) if rest_error else [k for k in whole if k not in rest]
        if not became[module]:
            verdict.skipped.update({k: "diffusers' converter drops it" for k in keys_of[module]})
    injected = _inject(target, whole, lora)
    for module, produced in became.items():
        missing = [k for k in produced if k not in injected]
        if produced and missing:
            reason = injected.get("?" + missing[0]) or f"peft made no adapter weight {missing[0]} in the transformer"
            verdict.skipped.update({k: reason for k in keys_of[module]})
    if any("does not fit" in reason for reason in injected.values()):
        verdict.note = "peft raises on the whole file for a weight of another shape; without the keys it skips, the rest would load"
    return verdict


def _refused_file(verdict: LoaderVerdict, error: str, lora: LoraFile, target: Target, pipeline, keys_of: dict) -> LoaderVerdict:
    """The entries that make the stock loader raise: those outside the family's known, complete entries on which the
    conversion raises (or which it drops) when added to them."""
    entries = lora.entries()
    known = [m for m, entry in entries.items() if lora.layout == "DIFFUSERS_LORA" or _comfy_problem(m, entry, target) is None]
    base, known_error = _convert(pipeline, _tensors(lora, keys_of, known))
    if not known_error:
        verdict.note = f"the stock loader refuses the whole file ({error}); without the keys it skips, the rest would load"
        for module in (m for m in entries if m not in known):
            added, added_error = _convert(pipeline, _tensors(lora, keys_of, known + [module]))
            if added_error or not set(added) - set(base):
                reason = f"the stock loader raises on it ({added_error})" if added_error else "diffusers' converter drops it"
                verdict.skipped.update({k: reason for k in keys_of[module]})
    if not verdict.skipped:
        verdict.note = f"the stock loader refuses the whole file ({error})"
        verdict.skipped.update({k: "the whole file is refused" for k in lora.tensors})
    return verdict


def _tensors(lora: LoraFile, keys_of: dict[str, list[str]], modules: list[str]) -> dict:
    return {k: lora.tensors[k] for m in modules for k in keys_of[m]}


def _key(module: str, suffix: str) -> str:
    return f"{module}.{suffix}" if suffix else module


def _convert(pipeline, tensors: dict, keep: bool = False) -> tuple[dict | list, str | None]:
    """(the peft keys (dict with keep) the stock loader makes of `tensors`, under no prefix; or the error it raises)."""
    tensors = as_meta(tensors)
    try:
        with _quiet_diffusers():
            if pipeline is not None:
                converted = pipeline.lora_state_dict(dict(tensors))
                converted = converted[0] if isinstance(converted, tuple) else converted
            else:
                converted = tensors
    except Exception as error:  # what the stock loader would raise to the user
        return ({} if keep else []), f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
    # the pipeline loads its transformer from the keys under `transformer.` (what else it holds, it skips)
    converted = {k.removeprefix(DIFFUSERS_PREFIX): v for k, v in converted.items() if k.startswith(DIFFUSERS_PREFIX)}
    return (converted if keep else list(converted)), None


def _inject(target: Target, converted: dict, lora: LoraFile) -> dict[str, str]:
    """The peft keys the transformer's `load_lora_adapter` takes from `converted` (key → ""), and for those whose
    shape does not fit, "?" + key → why (they are left out: peft would raise on the whole file)."""
    fitting, misfits = {}, {}
    for key, tensor in converted.items():
        module, _, leaf = key.partition(".lora_")
        layer = target.linear(module) if leaf else None
        if layer is not None and leaf.startswith(("A.", "B.")) and tensor.ndim == 2:
            expected = layer.in_features if leaf.startswith("A.") else layer.out_features
            actual = tensor.shape[1] if leaf.startswith("A.") else tensor.shape[0]
            if expected != actual:
                misfits["?" + key] = f"shape {tuple(tensor.shape)} does not fit {module} ({layer.out_features} x {layer.in_features})"
                continue
        fitting[key] = tensor
    if not fitting:
        return misfits
    from peft import get_peft_model_state_dict

    metadata = lora.adapter_metadata if lora.layout == "DIFFUSERS_LORA" else None
    transformer = target.transformer
    with _quiet_diffusers():
        try:
            transformer.load_lora_adapter({DIFFUSERS_PREFIX + k: v for k, v in fitting.items()}, prefix="transformer",
                                          adapter_name=CHECK_ADAPTER, low_cpu_mem_usage=True,
                                          metadata={DIFFUSERS_PREFIX + k: v for k, v in metadata.items()} if metadata else None)
        except Exception as error:  # what the stock loader would raise to the user: nothing loads
            reason = f"peft refuses the file ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
            return {**{"?" + k: reason for k in fitting}, **misfits}
        taken = get_peft_model_state_dict(transformer, adapter_name=CHECK_ADAPTER)
        transformer.unload_lora()  # the plain Linear layers back, for the next check
    return {**{k: "" for k in taken if k in fitting}, **misfits}


# --- ComfyUI --------------------------------------------------------------------------------------------------------
def comfy_verdict(lora: LoraFile, target: Target) -> LoaderVerdict:
    """ComfyUI v0.30.0's `comfy.lora.load_lora`, key by key: for each module of its key map it reads `.alpha` and
    `.dora_scale` whatever else is there, then a LoRA when `lora_B` (or `lora_up`) is there, and then needs the
    matching `lora_A`: without it the loader raises (KeyError) and the file loads not at all. Every key it did not
    read is "lora key not loaded"."""
    if lora.layout == "DIFFUSERS_LORA":
        return LoaderVerdict("ComfyUI", False, "ComfyUI reads the original layout: `motiontune lora convert` it --to COMFY_LORA")
    verdict = LoaderVerdict("ComfyUI", True)
    raises = []
    for module, entry in lora.entries().items():
        keys = [_key(module, s) for s in entry.tensors]
        if entry.modality == "text encoder":
            verdict.not_checked.update(keys)
            continue
        if not module.startswith(COMFY_PREFIX) or module not in target.comfy_entries:
            verdict.skipped.update({k: f"no module {module} in {target.family.NAME}'s original layout" for k in keys})
            continue
        factors = [s for s in entry.tensors if s not in ("alpha", "dora_scale")]  # alpha and dora_scale are always read
        up, down = _lora_pair(entry)
        if up and not down:
            raises.append(module)
            verdict.skipped.update({k: f"{module} has {up} without its down factor: ComfyUI raises (KeyError) on the "
                                    "file" for k in keys})
            continue
        if entry.kind in ("LoRA", "DoRA") and down and not up:
            verdict.skipped[_key(module, down)] = f"{down} without its up factor: ComfyUI leaves it"
            continue
        shape = _update_shape(entry)
        if shape is None:
            verdict.skipped.update({_key(module, s): f"an incomplete {entry.kind}: ComfyUI leaves it" for s in factors})
            continue
        expected = target.entry_shape(module)
        if tuple(shape) != expected:
            verdict.skipped.update({_key(module, s): f"ComfyUI reads it but cannot apply it: its update is {shape[0]} x "
                                    f"{shape[1]}, the weight {expected[0]} x {expected[1]}" for s in factors})
            continue
        readable = COMFY_SUFFIXES[entry.kind]
        verdict.skipped.update({_key(module, s): f"ComfyUI's {entry.kind} adapter reads no '{s}'"
                                for s in entry.tensors if s not in readable})
    if raises:
        verdict.note = (f"ComfyUI v0.30.0 raises on this file and loads none of it: {len(raises)} module(s) have an up "
                        f"factor without its down factor ({raises[0]}, ...)")
    return verdict


def _comfy_problem(module: str, entry: Entry, target: Target) -> str | None:
    """Why an entry is not a complete adapter of a known module with the weight's shape, or None."""
    if module not in target.comfy_entries:
        return "unknown module"
    shape = _update_shape(entry)
    if shape is None:
        return "incomplete"
    return None if tuple(shape) == target.entry_shape(module) else "another shape"


def _lora_pair(entry: Entry) -> tuple[str | None, str | None]:
    """(the up, the down factor's suffix) of a LoRA entry, each None when missing."""
    for up, down in (("lora_up.weight", "lora_down.weight"), ("lora_B.weight", "lora_A.weight")):
        if up in entry.tensors or down in entry.tensors:
            return (up if up in entry.tensors else None), (down if down in entry.tensors else None)
    return None, None


def _update_shape(entry: Entry) -> tuple[int, int] | None:
    """(rows, columns) of the weight change an entry makes, None when a factor is missing."""
    t = entry.tensors

    def pair(up: str, down: str):
        return (t[up].shape[0], t[down].shape[1]) if up in t and down in t else None

    if entry.kind == "LoHa":
        return pair("hada_w1_a", "hada_w1_b")
    if entry.kind == "LoKr":
        first = t["lokr_w1"].shape if "lokr_w1" in t else pair("lokr_w1_a", "lokr_w1_b")
        second = t["lokr_w2"].shape if "lokr_w2" in t else pair("lokr_w2_a", "lokr_w2_b")
        return (first[0] * second[0], first[1] * second[1]) if first and second else None
    return pair("lora_B.weight", "lora_A.weight") or pair("lora_up.weight", "lora_down.weight")


# --- dropping a modality --------------------------------------------------------------------------------------------
def without(lora: LoraFile, dropped: str) -> dict:
    """The file's tensors without the modules that adapt `dropped` (audio, video or text encoder)."""
    if dropped not in MODALITIES:
        raise ValueError(f"--drop {dropped!r}: say one of {', '.join(MODALITIES)}")
    kept = {}
    for module, entry in lora.entries().items():
        if entry.modality != dropped:
            kept.update({_key(module, s): t for s, t in entry.tensors.items()})
    return kept


def dtype_name(tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")

