"""The config schema the UI's forms are built from: `TrainConfig.model_json_schema()` (types, defaults,
ranges, choices), with each field's help text taken from the schema's description or, where the schema
has none, from the comments beside the field in `config/schema.py`. Both are read from the code at
request time, so the forms never drift from what training validates."""

from __future__ import annotations

import ast
import copy
import inspect
import io
import tokenize
from functools import lru_cache

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
    return schema
