"""Reading a config: shipped presets, JSON files, `--set` overrides, and errors a user can act on. The checks
here are those that need no model family; motiontune/configure.py adds the family's and is what callers use."""

from __future__ import annotations

import difflib
import json
import re
import typing
from pathlib import Path

from pydantic import BaseModel, ValidationError

from ..util.files import read_json_file
from .concepts import concept_problems
from .schema import NOT_SUPPORTED_YET, OUTPUT_FORMATS, MemoryPlan, TrainConfig, get_dotted

PRESETS_DIR = Path(__file__).parent / "presets"


class ConfigError(Exception):
    """A config problem, worded for the user: what is wrong, where, and what to do."""


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


def find_config_file(name: str) -> Path:
    """A path, or the name of a shipped preset (with or without `.json`)."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (PRESETS_DIR / name, PRESETS_DIR / f"{name}.json"):
        if candidate.is_file():
            return candidate
    hint = ""
    close = difflib.get_close_matches(name.removesuffix(".json"), list_presets(), n=1)
    if close:
        hint = f" Did you mean the preset {close[0]!r}?"
    raise ConfigError(
        f"config {name!r} is neither a file nor a shipped preset.{hint} "
        f"Shipped presets: {', '.join(repr(p) for p in list_presets())} (`motiontune presets`)."
    )


def read_json(path: Path) -> dict:
    try:
        data = read_json_file(path)
    except ValueError as error:
        raise ConfigError(f"{path}: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a JSON object {{...}}, got {type(data).__name__}")
    return data


def apply_override(data: dict, assignment: str) -> None:
    """`--set a.b=value`: the value is read as JSON when it parses (numbers, true, lists), else as text."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: write it as key=value, e.g. --set video_config.max_frames=33")
    key, raw = assignment.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    parts = key.strip().split(".")
    # the two ways of naming the data replace each other: `--set concepts=[...]` on a preset drops its concept file
    other = {"concepts": "concept_file_name", "concept_file_name": "concepts"}.get(key.strip())
    if other and value is not None:
        data.pop(other, None)
    node = data
    for part in parts[:-1]:
        if isinstance(node, list):
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
    if isinstance(node, list):
        node[int(parts[-1])] = value
    else:
        node[parts[-1]] = value


def read_config(name: str, overrides: list[str] = ()) -> tuple[dict, Path]:
    """The JSON of a config file or preset with `--set` overrides applied, and where it was found."""
    path = find_config_file(name)
    data = read_json(path)
    for assignment in overrides:
        apply_override(data, assignment)
    return data, path


def _model_class(annotation) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):  # list[X], X | None
        found = _model_class(arg)
        if found is not None:
            return found
    return None


def _known_keys(loc: tuple) -> list[str]:
    """The valid key names inside the section at `loc` (for "did you mean")."""
    model = TrainConfig
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        inner = _model_class(field.annotation) if field is not None else None
        if inner is not None:
            model = inner
    return [field.alias or key for key, field in model.model_fields.items()]


def _sections_with_key(loc: tuple, key: str) -> list[str]:
    """Dotted names of the sections directly inside `loc` that have `key`, e.g. transformer.weight_dtype."""
    model = TrainConfig
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        model = (_model_class(field.annotation) if field is not None else None) or model
    found = []
    for name, field in model.model_fields.items():
        inner = _model_class(field.annotation)
        if inner is not None and key in inner.model_fields:
            found.append(".".join([*(str(p) for p in loc), name, key]))
    return found


# what people type for a dtype (torch's and other trainers' names) → the config's name for it
DTYPE_ALIASES = {"bf16": "BFLOAT_16", "bfloat16": "BFLOAT_16", "fp16": "FLOAT_16", "float16": "FLOAT_16",
                 "half": "FLOAT_16", "fp32": "FLOAT_32", "float32": "FLOAT_32", "float": "FLOAT_32",
                 "fp8": "FLOAT_8", "float8": "FLOAT_8", "float8_e4m3fn": "FLOAT_8", "nf4": "NFLOAT_4"}
# OneTrainer's weight_dtype values for 8-bit matmuls → this config's compute_dtype
ONETRAINER_W8A8 = {"FLOAT_W8A8": "FLOAT_8", "INT_W8A8": "INT_8"}
# pydantic's bounds, said as docs/config.md says them
_BOUNDS = {"greater_than": ("above", "gt"), "greater_than_equal": ("at least", "ge"),
           "less_than": ("below", "lt"), "less_than_equal": ("at most", "le")}


def accepted_choices(problem: dict) -> list[str]:
    """For a value that is not one of the choices: the choices that are built (train_dtype's schema knows
    FLOAT_8 and NFLOAT_4, which only store weights)."""
    choices = re.findall(r"'([^']*)'", problem.get("ctx", {}).get("expected", ""))
    key = ".".join(str(p) for p in problem["loc"])
    for name, neutral, _ in NOT_SUPPORTED_YET:
        if name == key and isinstance(neutral, tuple):
            return [c for c in choices if c in neutral]
    return choices


def closest_choice(problem: dict) -> str | None:
    """The accepted choice the user most likely meant ("bf16" → BFLOAT_16, "COSINUS" → COSINE), if any."""
    if problem["type"] != "literal_error":
        return None
    choices, typed = accepted_choices(problem), str(problem.get("input"))
    alias = DTYPE_ALIASES.get(typed.lower())
    if alias in choices:
        return alias
    close = difflib.get_close_matches(typed, choices, n=1, cutoff=0.5)
    return close[0] if close else None


def explain(problem: dict) -> str | None:
    """A wrong value's problem in the product's words, or None where pydantic's own message is the best there is."""
    kind, ctx = problem["type"], problem.get("ctx", {})
    if kind in _BOUNDS:
        words, name = _BOUNDS[kind]
        return f"must be {words} {ctx[name]}"
    if kind == "literal_error" and str(problem.get("input")) in ONETRAINER_W8A8:
        # OneTrainer's one value for 8-bit storage and 8-bit matmuls of frozen weights; two keys here
        compute = ONETRAINER_W8A8[str(problem["input"])]
        part = ".".join(str(p) for p in problem["loc"][:-1]) or "transformer"
        return (f"OneTrainer's W8A8 value; here the matmul's dtype is a key of its own: set {part}.compute_dtype to "
                f"{compute!r} and leave weight_dtype unset (docs/memory.md, \"FLOAT_8 and INT_8 compute\")")
    if kind == "literal_error":
        choices = [repr(c) for c in accepted_choices(problem)]
        listed = choices[0] if len(choices) == 1 else f"{', '.join(choices[:-1])} or {choices[-1]}"
        close = closest_choice(problem)
        return f"not a choice: use {listed}" + (f"; did you mean {close!r}?" if close else "")
    return None


def format_validation_error(error: ValidationError, path: Path) -> str:
    lines = [f"{path}: the config has {error.error_count()} problem(s):"]
    for problem in error.errors():
        loc = tuple(problem["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        if problem["type"] == "extra_forbidden":
            known = _known_keys(loc[:-1])
            nested = _sections_with_key(loc[:-1], str(loc[-1]))
            close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
            if nested:  # a key that exists, one level down (`weight_dtype` belongs to each model part)
                hint = f" It is set inside a section: {' or '.join(repr(n) for n in nested)}."
            elif close:
                hint = f" Did you mean {close[0]!r}?"
            else:
                hint = f" Known keys here: {', '.join(sorted(known))}."
            lines.append(f"  - unknown key {key!r}.{hint}")
        elif not loc:  # a rule about several keys: its message says which; the whole config is no help
            lines.append(f"  - {problem['msg'].removeprefix('Value error, ')}")
        elif problem["type"] == "missing":
            lines.append(f"  - {key}: this key is required")
        else:
            value = problem.get("input")
            lines.append(f"  - {key} = {json.dumps(value, default=str)}: {explain(problem) or problem['msg']}")
    lines.append("Fix the file (or the --set value) and run again; `docs/config.md` lists every key.")
    return "\n".join(lines)


def _text_training_problems(config: TrainConfig) -> list[str]:
    """Text encoder training and embeddings: which methods and families have them, and sound embedding entries."""
    problems = []
    if config.text_encoder.train and config.training_method != "FINE_TUNE":
        problems.append(f"  - text_encoder.train = true: the text encoder trains in FINE_TUNE runs only, not in "
                        f"{config.training_method} runs; set it to false")
    seen = set()
    for where, entry in [("embedding", config.embedding)] * (config.training_method == "EMBEDDING") + [
        (f"additional_embeddings[{i}]", e) for i, e in enumerate(config.additional_embeddings)
    ]:
        if entry.placeholder in seen:
            problems.append(f"  - {where}.placeholder = {json.dumps(entry.placeholder)}: two embeddings use it; "
                            "give each its own placeholder")
        seen.add(entry.placeholder)
        if entry.is_output_embedding:
            problems.append(f"  - {where}.is_output_embedding = true: not supported yet (output embeddings); leave it false")
        if entry.stop_training_after is not None or entry.stop_training_after_unit != "NEVER":
            problems.append(f"  - {where}.stop_training_after: not supported yet (stopping an embedding early); "
                            "leave it null and stop_training_after_unit NEVER")
        if not entry.train and not entry.model_name:
            problems.append(f"  - {where}.train = false needs {where}.model_name: a saved embedding to use as it is")
        if entry.token_count is None and not entry.model_name:
            problems.append(f"  - {where}.token_count = null takes the count from model_name, which is empty; "
                            "set token_count (1 or more)")
    return problems


def _memory_problems(config: TrainConfig) -> list[str]:
    """Memory options that cannot apply to weights that train."""
    problems = []
    if config.training_method != "FINE_TUNE":
        return problems
    for part in ("transformer", "transformer_2"):
        settings = getattr(config, part)
        if not settings.train:
            continue
        if settings.weight_dtype in ("FLOAT_8", "NFLOAT_4"):
            problems.append(f"  - {part}.weight_dtype = {settings.weight_dtype}: a full fine-tune trains these weights, and "
                            "quantized weights cannot train; use BFLOAT_16 (or train a LoRA on the quantized model)")
        if settings.offload_fraction or config.layer_offload_fraction:
            problems.append(f"  - layer offloading ({part}.offload_fraction / layer_offload_fraction): it streams frozen "
                            "weights, and a full fine-tune trains all of them; set it to 0 (shard over GPUs with torchrun instead)")
    return problems


def _compute_problems(config: TrainConfig) -> list[str]:
    """FLOAT_8 / INT_8 compute (torchao's matmuls on the layer's own train-dtype weight) against what it cannot use.
    Whether the GPU can run it is checked when the run starts (train/memory.py)."""
    problems = []
    for part in ("transformer", "transformer_2"):
        settings = getattr(config, part)
        compute = settings.compute_dtype
        if compute is None:
            continue
        key = f"{part}.compute_dtype = {compute}"
        storage = settings.weight_dtype or config.train_dtype
        if storage in ("FLOAT_8", "NFLOAT_4"):
            problems.append(
                f"  - {key} with {part}.weight_dtype = {storage}: {compute} compute casts the layer's own {config.train_dtype} "
                f"weight to {compute.lower().replace('_', '')} for each matmul, and {storage} storage keeps no such weight. "
                f"Choose one: weight_dtype {storage} for memory (remove compute_dtype), or compute_dtype {compute} for speed "
                f"(set {part}.weight_dtype to {config.train_dtype})")
        if config.expert_choice() not in (("both", "high") if part == "transformer" else ("both", "low")):
            problems.append(f"  - {key}: {part} does not train in this run, and compute_dtype applies to the "
                            f"transformers a run trains; remove it (or set {part}.train true)")
    return problems


def _compile_problems(config: TrainConfig) -> list[str]:
    if not config.compile:
        return []
    # an offloaded block's weights are swapped in and out, and a compiled block would compile again each time
    if any(MemoryPlan.of(config, part).offload_fraction > 0 for part in ("transformer", "transformer_2")):
        return ["  - compile = true with layer offloading (offload_fraction / layer_offload_fraction): they do not "
                "combine yet; set compile false, or layer offloading to 0"]
    return []


def _adapter_problems(config: TrainConfig) -> list[str]:
    """Adapter kinds (peft_type, DoRA) against each other and against quantized base weights."""
    if config.training_method != "LORA":
        chosen = [f"{k} = {json.dumps(v)}" for k, v in (("peft_type", config.peft_type), ("lora_decompose", config.lora_decompose))
                  if v not in ("LORA", False)]
        return [f"  - {key}: a {config.training_method} run trains no adapter; remove it, or set training_method to LORA"
                for key in chosen]
    problems = []
    if config.lora_decompose and config.peft_type != "LORA":
        problems.append(f"  - lora_decompose = true with peft_type = {config.peft_type}: DoRA is built for peft_type LORA "
                        "only; set lora_decompose to false, or peft_type to LORA")
    if config.lora_dropout and config.peft_type != "LORA":
        problems.append(f"  - lora_dropout = {config.lora_dropout} with peft_type = {config.peft_type}: peft's {config.peft_type} "
                        "has no input dropout; set lora_dropout to 0")
    kind = "DoRA (lora_decompose)" if config.lora_decompose else config.peft_type
    if kind != "LORA":
        for part in ("transformer", "transformer_2"):
            settings = getattr(config, part)
            storage = settings.weight_dtype or config.train_dtype
            if settings.train and storage in ("FLOAT_8", "NFLOAT_4"):
                problems.append(
                    f"  - {part}.weight_dtype = {storage} with {kind}: peft's {kind} reads the layer's plain weight, which "
                    f"a quantized layer does not keep; use peft_type LORA with lora_decompose false on a quantized model, "
                    f"or set {part}.weight_dtype to BFLOAT_16")
    return problems


def image_file_problem(path: str) -> str | None:
    """What is wrong with a picture file a config names, if anything."""
    from PIL import Image

    if not Path(path).is_file():
        return "no such file"
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception:  # Pillow raises many kinds for a file that is not a picture
        return "not an image Pillow can read; give a PNG, JPEG or WebP file"
    return None


def config_problems(config: TrainConfig) -> list[str]:
    """Every problem that needs no model family, one line each: values not built yet, text training and
    embeddings, memory options, concepts, the output format."""
    problems = []
    for key, neutral, what in NOT_SUPPORTED_YET:
        value = get_dotted(config, key)
        allowed = neutral if isinstance(neutral, tuple) else (neutral,)
        if value not in allowed:
            shown = " or ".join(json.dumps(a) for a in allowed)
            problems.append(f"  - {key} = {json.dumps(value)}: not supported yet ({what}); leave it at {shown}")
    problems += (_text_training_problems(config) + _memory_problems(config) + _compute_problems(config)
                 + _compile_problems(config) + _adapter_problems(config))
    for index, concept in enumerate(config.concepts or []):
        if concept.enabled:
            problems += [f"  - concepts[{index}].{problem}" for problem in concept_problems(concept, config.training_method)]
    allowed = OUTPUT_FORMATS.get(config.training_method, ())
    if allowed and config.output_model_format not in allowed:
        problems.append(
            f"  - output_model_format = {json.dumps(config.output_model_format)}: a {config.training_method} run saves "
            f"as {' or '.join(allowed)}"
        )
    return problems
