"""The config schema the UI's forms are built from: `TrainConfig.model_json_schema()` (types, defaults,
ranges, choices), with each field's help text from docs/config.md, the one place the keys are explained (its
tables: a row per key, with units, ranges and rounding rules), followed by the schema's description or the
comment beside the field in `config/schema.py` when it adds something. All are read at request time, so the
forms never drift from what training validates or from the documentation."""

from __future__ import annotations

import ast
import copy
import inspect
import io
import re
import tokenize
from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel

from ..config import schema as schema_module
from ..config.schema import NOT_SUPPORTED_YET, TrainConfig
from ..models import model_types


def _comments_by_line(source: str) -> dict[int, str]:
    comments = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    return comments


@lru_cache(maxsize=1)
def field_comments() -> dict[str, dict[str, str]]:
    """class name → field name → the comment on the field's line, or the comment lines just above it."""
    source = inspect.getsource(schema_module)
    lines = source.splitlines()
    comments = _comments_by_line(source)
    found: dict[str, dict[str, str]] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields = found.setdefault(node.name, {})
        for statement in node.body:
            if not (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)):
                continue
            texts = []
            line = statement.lineno - 1
            above = []
            while line >= 1 and lines[line - 1].strip().startswith("#"):
                above.insert(0, comments.get(line, ""))
                line -= 1
            texts += above
            for number in range(statement.lineno, (statement.end_lineno or statement.lineno) + 1):
                if number in comments and not lines[number - 1].strip().startswith("#"):
                    texts.append(comments[number])
            if texts:
                fields[statement.target.id] = " ".join(t for t in texts if t)
    return found


# docs/config.md: the copy a wheel ships beside this module (setup.py puts it there), else a source checkout's
_PACKAGED = Path(__file__).resolve().parent / "config.md"
DOCS = _PACKAGED if _PACKAGED.is_file() else Path(__file__).resolve().parents[2] / "docs" / "config.md"
# docs/config.md's sections whose tables name keys inside a section; "part." serves every model part
DOC_PREFIXES = {"video_config": "video_config.", "Concepts": "concepts.", "Model parts": "part.",
                "Samples": "samples.", "Embeddings": "embedding."}
PARTS = ("transformer", "transformer_2", "text_encoder", "vae")
_LINK = re.compile(r"\[([^\]]+)\]\([^)]+\)")


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


@lru_cache(maxsize=1)
def docs_help(path: Path = DOCS) -> dict[str, str]:
    """Dotted key → its row of docs/config.md's tables, as one line of text ("default 16 · 1 – 1024")."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return {}
    found, prefix, header = {}, "", []
    for index, line in enumerate(lines):
        if line.startswith("#"):
            prefix, header = DOC_PREFIXES.get(line.lstrip("#").strip(), ""), []
            continue
        if not line.startswith("|"):
            header = []
            continue
        cells = _cells(line)
        if not header:  # the first row of a table names its columns; the second is the --- line
            header = cells
            continue
        if set(cells[0]) <= set("- "):
            continue
        keys, inherited = [], ""
        for key in re.findall(r"`([^`]+)`", cells[0]):
            if "." in key:
                inherited = key.rsplit(".", 1)[0] + "."
            elif inherited:
                key = inherited + key
            keys.append(prefix + key)
        for number, key in enumerate(keys):
            parts = []
            for title, cell in zip(header[1:], cells[1:]):
                values = cell.split(", ")
                if title == "default" and len(keys) > 1 and len(values) == len(keys):
                    cell = values[number]  # `a`, `b` | 1, 2: each key its own default
                if cell:
                    parts.append(f"{title} {cell}" if title in ("default", "range") else cell)
            found[key] = _LINK.sub(r"\1", " · ".join(parts)).replace("`", "")
    return found


def doc_key(path: list) -> str:
    """A field's path in the config → its key in docs/config.md (list items and model parts share one row)."""
    names = [str(p) for p in path if not isinstance(p, int) and not str(p).isdigit()]
    if names and names[0] in PARTS and len(names) > 1:
        names[0] = "part"
    if names and names[0] == "additional_embeddings":
        names[0] = "embedding"
    return ".".join(names)


def _not_supported_notes() -> dict[str, str]:
    notes = {}
    for key, neutral, what in NOT_SUPPORTED_YET:
        allowed = neutral if isinstance(neutral, tuple) else (neutral,)
        shown = ", ".join("null" if a is None else str(a).lower() if isinstance(a, bool) else str(a) for a in allowed)
        notes[key] = f"Other values not built yet ({what}): only {shown} is accepted."
    return notes


def _models() -> dict[str, type[BaseModel]]:
    return {name: value for name, value in vars(schema_module).items()
            if isinstance(value, type) and issubclass(value, BaseModel) and value.__module__ == schema_module.__name__}


def ui_schema() -> dict:
    """The JSON schema with `description` filled in from comments, model_type's choices and `x-not-supported`
    notes added."""
    schema = copy.deepcopy(TrainConfig.model_json_schema())
    comments = field_comments()
    models = _models()
    definitions = schema.get("$defs", {})

    def fill(node: dict, class_name: str) -> None:
        model = models.get(class_name)
        if model is None:
            return
        by_alias = {(f.alias or name): name for name, f in model.model_fields.items()}
        for key, prop in node.get("properties", {}).items():
            name = by_alias.get(key, key)
            if not prop.get("description") and comments.get(class_name, {}).get(name):
                prop["description"] = comments[class_name][name]

    fill(schema, "TrainConfig")
    schema["properties"]["model_type"]["enum"] = list(model_types())  # the families' choices (the schema has a str)
    for name, node in definitions.items():
        fill(node, name)
    notes = _not_supported_notes()
    for key, note in notes.items():
        parts = key.split(".")
        node = schema
        for part in parts[:-1]:
            ref = node["properties"][part].get("$ref") or next(
                (a["$ref"] for a in node["properties"][part].get("anyOf", []) if "$ref" in a), None)
            node = definitions[ref.rsplit("/", 1)[-1]] if ref else {}
        prop = node.get("properties", {}).get(parts[-1])
        if prop is not None:
            # keyed by the section path: `vae.train` is refused, `transformer.train` (the same model) is not
            prop.setdefault("x-not-supported", {})[".".join(parts[:-1])] = note
            if "." not in key and ("enum" in prop or "anyOf" in prop):  # offer only the values accepted today
                prop["x-accepted"] = [v for v in NOT_SUPPORTED_YET_VALUES[key] if v is not None]
    for key, prop in schema["properties"].items():
        prop["x-group"] = GROUP_OF.get(key, "general")
    schema["x-groups"] = list(GROUPS)
    helps = docs_help()
    explained: dict[tuple, str] = {}  # (section, paragraph) → the first key of the section that shows it
    for path, prop in schema_keys(schema):
        text = helps.get(doc_key(path))
        if not text:
            continue
        # one docs row may explain several keys of a section (validation, validate_after, ...): the paragraph
        # shows once, under the first of them, and the others point there (each keeps its own default)
        default, _, paragraph = text.partition(" · ") if text.startswith("default") else ("", "", text)
        first = explained.setdefault((tuple(path[:-1]), paragraph), str(path[-1]))
        if first != str(path[-1]) and default and len(paragraph) > 40:  # a range ("≥ 1") is worth repeating
            text = f"{default} · see {first}, above"
        prop["x-help"] = text
    return schema


# OneTrainer's tabs, and the top-level keys each holds in the form ("concepts" is the concept editor; "tools" the
# memory estimate). A key not listed shows under general: tests/test_ui.py checks that none is left out.
GROUPS = {
    "general": ["workspace_dir", "cache_dir", "train_device", "seed", "dataloader_threads", "validation",
                "validate_after", "validate_after_unit", "__version"],
    "model": ["model_type", "training_method", "base_model_name", "train_dtype", "transformer", "transformer_2",
              "text_encoder", "vae", "experts", "boundary_ratio", "experts_on", "image_conditioning_probability",
              "last_frame_conditioning_probability", "in_context_control", "reference_downscale_factor",
              "guidance_scale",
              "gradient_checkpointing", "layer_offload_fraction", "layer_offload_prefetch", "output_model_destination",
              "output_model_format", "output_dtype"],
    "data": ["resolution", "aspect_ratio_bucketing", "latent_caching", "encode_in_child", "memory", "concept_file_name", "video_config"],
    "concepts": ["concepts"],
    "training": ["batch_size", "gradient_accumulation_steps", "learning_rate", "epochs", "optimizer",
                 "learning_rate_scheduler", "learning_rate_warmup_steps", "clip_grad_norm", "lora_rank", "lora_alpha",
                 "lora_dropout", "peft_type", "lora_decompose", "lora_decompose_norm_epsilon", "lora_decompose_output_axis",
                 "lokr_dim", "lokr_decompose_both", "lokr_decompose_factor", "lokr_use_tucker", "lokr_weight_decompose",
                 "lokr_dora_on_output", "lokr_full_matrix", "lokr_vec_trick", "layer_filter", "frozen_loras", "timestep_distribution",
                 "timestep_shift", "noising_weight", "noising_bias", "min_noising_strength", "max_noising_strength",
                 "noising_strength_mode", "max_nonfinite_steps", "compile", "masked_training", "unmasked_probability",
                 "unmasked_weight", "normalize_masked_area_loss", "embedding", "additional_embeddings", "embedding_learning_rate",
                 "preserve_embedding_norm", "embedding_weight_dtype", "train_audio", "audio_loss_weight", "audio_noise_level",
                 "context_parallel"],
    "sampling": ["sample_after", "sample_after_unit", "sample_steps", "sample_cfg_scale", "samples"],
    "backup": ["backup_after", "backup_after_unit", "rolling_backup", "rolling_backup_count", "backup_before_save",
               "save_every", "save_every_unit", "continue_last_backup"],
    "tools": [],
}
GROUP_OF = {key: group for group, keys in GROUPS.items() for key in keys}

NOT_SUPPORTED_YET_VALUES = {key: neutral if isinstance(neutral, tuple) else (neutral,) for key, neutral, _ in NOT_SUPPORTED_YET}


def schema_keys(schema: dict | None = None) -> list[tuple[list, dict]]:
    """Every key of the config at every depth: (its path, with 0 for list items; its schema property)."""
    schema = schema or ui_schema()
    definitions = schema.get("$defs", {})

    def inner(prop: dict) -> tuple[dict | None, bool]:
        branches = prop.get("anyOf", [prop])
        for branch in branches:
            if branch.get("type") == "array":
                items = branch.get("items", {})
                return definitions.get(items.get("$ref", "").rsplit("/", 1)[-1]), True
            if "$ref" in branch:
                return definitions.get(branch["$ref"].rsplit("/", 1)[-1]), False
        return None, False

    found = []

    def walk(node: dict, path: list) -> None:
        for key, prop in node.get("properties", {}).items():
            found.append(([*path, key], prop))
            child, is_list = inner(prop)
            if child is not None and child.get("properties"):
                walk(child, [*path, key, 0] if is_list else [*path, key])

    walk(schema, [])
    return found
