"""Embedding (textual inversion): new tokens in each text encoder's vocabulary whose vectors train while every
weight of the model stays frozen. Captions name them by their placeholder.

Saved file (`output_model_format: SAFETENSORS`): one tensor per text encoder, keyed by the family's name for it
(WAN: `umt5xxl`, the key ComfyUI looks for), shaped (token_count, dim), and metadata:
`placeholder` (the text written in captions), `tokens` (JSON list of the token strings added to the tokenizer; the
placeholder stands for them joined without spaces) and `format` = `motiontune.embedding/1`. docs/embeddings.md
shows how to load it into the stock pipeline's tokenizer and text encoder.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import ConfigError, TrainConfig
from ..config.schema import EmbeddingConfig
from ..models import ModelFamily
from ..models.base import Expert
from .base import saving

log = logging.getLogger("motiontune")

FORMAT = "motiontune.embedding/1"
SHARDED = False  # the vectors are replicated on every rank, their gradients summed


def token_strings(placeholder: str, count: int) -> list[str]:
    """The tokens an embedding adds: the placeholder itself for one vector, `<placeholder>_0`, ... for more."""
    return [placeholder] if count == 1 else [f"{placeholder}_{i}" for i in range(count)]


def expand(text: str, placeholder: str, tokens: list[str]) -> str:
    """A caption or prompt with the placeholder replaced by its tokens (unchanged for a one-token embedding)."""
    return text.replace(placeholder, "".join(tokens))


class TokenVectors(torch.nn.Module):
    """A text encoder's input embedding table with trained rows for added token ids: every other id reads the
    frozen table, so prompts without the new tokens are encoded exactly as before."""

    def __init__(self, table: torch.nn.Embedding):
        super().__init__()
        self.table = table
        self.vectors = torch.nn.ParameterList()  # one (count, dim) tensor per embedding
        self.ids: list[list[int]] = []

    def add(self, ids: list[int], initial: torch.Tensor, train: bool) -> torch.nn.Parameter:
        vectors = torch.nn.Parameter(initial.detach().float().clone(), requires_grad=train)
        self.vectors.append(vectors)
        self.ids.append(list(ids))
        return vectors

    @property
    def weight(self) -> torch.Tensor:  # what code that reads `get_input_embeddings().weight` expects
        return self.table.weight

    @property
    def num_embeddings(self) -> int:
        return self.table.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.table.embedding_dim

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.table(input_ids.clamp(max=self.table.num_embeddings - 1))
        if not self.ids:
            return out
        all_ids = torch.tensor([i for ids in self.ids for i in ids], device=input_ids.device)
        slot = torch.full((int(max(all_ids.max(), input_ids.max())) + 1,), -1, dtype=torch.long, device=input_ids.device)
        slot[all_ids] = torch.arange(len(all_ids), device=input_ids.device)
        slot = slot[input_ids]
        rows = torch.cat(list(self.vectors)).to(out.dtype)[slot.clamp(min=0)]
        return torch.where((slot >= 0).unsqueeze(-1), rows, out)


@dataclass
class Embedding:
    """One embedding as it trains: its config entry, tokens, and a vector tensor per text encoder."""

    config: EmbeddingConfig
    tokens: list[str]
    vectors: dict[str, torch.nn.Parameter]

    def expand(self, text: str) -> str:
        return expand(text, self.config.placeholder, self.tokens)


def read_embedding(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The vectors (per text-encoder key) and metadata of a saved embedding."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        raise ConfigError(f"embedding model_name {str(path)!r} is not a .safetensors file")
    with safe_open(str(path), "pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})


def install(family: ModelFamily, entry: EmbeddingConfig) -> Embedding:
    """Add `entry`'s tokens to every text encoder's tokenizer and give them vectors: those of `model_name`'s file,
    or the token embeddings of `initial_embedding_text` (repeated to token_count)."""
    saved = read_embedding(entry.model_name)[0] if entry.model_name else {}
    count = entry.token_count or len(next(iter(saved.values())))
    tokens = token_strings(entry.placeholder, count)
    vectors = {}
    for key, (tokenizer, encoder) in family.text_encoders().items():
        wrapper = encoder.get_input_embeddings()
        if not isinstance(wrapper, TokenVectors):
            wrapper = TokenVectors(wrapper)
            encoder.set_input_embeddings(wrapper)
        clashes = [t for t in tokens if t in tokenizer.get_vocab()]
        if clashes:
            raise ConfigError(f"embedding placeholder {entry.placeholder!r}: the tokenizer already has the token(s) "
                             f"{clashes}; choose a placeholder that is not a word of its vocabulary, such as '<my-concept>'")
        tokenizer.add_tokens(tokens)
        ids = tokenizer.convert_tokens_to_ids(tokens)
        split = tokenizer(expand(entry.placeholder, entry.placeholder, tokens), add_special_tokens=False).input_ids
        if split != ids:
            raise ConfigError(f"embedding placeholder {entry.placeholder!r} does not tokenize to its own tokens "
                             f"({split} instead of {ids}); choose a simpler placeholder such as '<my-concept>'")
        if key in saved:
            initial = saved[key]
            if initial.shape != (count, wrapper.table.embedding_dim):
                raise ConfigError(f"{entry.model_name}: {key} vectors are {tuple(initial.shape)}, this model needs "
                                 f"({count}, {wrapper.table.embedding_dim}); is the file for another model or token_count?")
        else:
            if entry.model_name:
                raise ConfigError(f"{entry.model_name} has no {key!r} vectors (it has {sorted(saved)}): it was saved for "
                                 "another model family")
            initial_ids = tokenizer(entry.initial_embedding_text, add_special_tokens=False).input_ids or [tokenizer.unk_token_id]
            if len(initial_ids) > count:
                log.info("initial_embedding_text %r has %d tokens; the first %d start the embedding",
                         entry.initial_embedding_text, len(initial_ids), count)
            initial_ids = (initial_ids * count)[:count]
            with torch.no_grad():
                initial = wrapper.table.weight[torch.tensor(initial_ids, device=wrapper.table.weight.device)].float()
        vectors[key] = wrapper.add(ids, initial.to(wrapper.table.weight.device), entry.train)
    return Embedding(entry, tokens, vectors)


def installed(family: ModelFamily) -> list[Embedding]:
    return getattr(family, "_motiontune_embeddings", [])


def prepare(family: ModelFamily, expert: Expert, config: TrainConfig) -> list[torch.nn.Parameter]:
    """The transformer stays frozen: nothing of the expert trains (the vectors train on the text side)."""
    return []


def trained_embeddings(config: TrainConfig) -> list[EmbeddingConfig]:
    return [config.embedding]


def untrained(expert: Expert):
    """Not offered: an embedding run's transformer is the base model already; config checks refuse PRIOR_PREDICTION concepts before a run starts."""
    raise NotImplementedError("PRIOR_PREDICTION concepts need training_method LORA")


def save(family: ModelFamily, config: TrainConfig, destination: Path, output_format: str | None = None,
         states: dict | None = None) -> list[Path]:
    """An EMBEDDING run's embedding at `destination` (additional ones go beside it: `save_additional`)."""
    main = [e for e in installed(family) if e.config is config.embedding]
    return [write(main[0], Path(destination), config)]


def save_additional(family: ModelFamily, config: TrainConfig, destination: Path) -> list[Path]:
    """additional_embeddings, as OneTrainer places them: `<destination without suffix>_embeddings/<placeholder>.safetensors`."""
    destination = Path(destination)
    folder = destination.with_name(f"{destination.stem if destination.suffix else destination.name}_embeddings")
    extra = [e for e in installed(family) if e.config is not config.embedding]  # an EMBEDDING run's own one: `save`
    return [write(e, folder / f"{_file_name(e.config.placeholder)}.safetensors", config) for e in extra]


def _file_name(placeholder: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in placeholder).strip("_") or "embedding"


def write(embedding: Embedding, destination: Path, config: TrainConfig) -> Path:
    """One embedding file, written atomically."""
    tensors = {key: v.detach().to("cpu", torch.float32).contiguous() for key, v in embedding.vectors.items()}
    metadata = {"format": FORMAT, "placeholder": embedding.config.placeholder, "tokens": json.dumps(embedding.tokens),
                "model_type": config.model_type}
    with saving(destination, "embedding") as written:
        save_file(tensors, str(written), metadata=metadata)
    return destination
