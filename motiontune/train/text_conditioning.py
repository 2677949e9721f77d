"""The text side of a training step: a batch's caption embeddings, from the cache when the text encoder is
frozen, or encoded live with gradients when it trains (FINE_TUNE with `text_encoder.train`) or when embeddings
train (EMBEDDING, `additional_embeddings`). Owns the optimizer of whatever trains on that side."""

from __future__ import annotations

import logging

import torch

from ..config import TrainConfig
from ..methods import METHODS
from ..methods import embedding as embeddings
from ..models import ModelFamily
from ..models.base import Expert
from .optim import make_optimizer, make_scheduler
from .step import ExpertTraining

log = logging.getLogger("motiontune")

NAME = "text_encoder"  # the Expert name its training goes by (backups: adapters-text_encoder.safetensors)


class TextParts(torch.nn.Module):
    """What trains on the text side, in one module so backups save and restore it like an expert's adapters."""

    def __init__(self, encoders: dict[str, torch.nn.Module], vectors: dict[str, torch.nn.Parameter]):
        super().__init__()
        self.encoders = torch.nn.ModuleDict(encoders)
        self.embeddings = torch.nn.ParameterDict(vectors)


class TextConditioning:
    def __init__(self, family: ModelFamily, config: TrainConfig, cached: dict[str, torch.Tensor]):
        self.family, self.config, self.cached = family, config, cached
        entries = METHODS[config.training_method].trained_embeddings(config) + list(config.additional_embeddings)
        self.entries = entries
        self.live = bool(config.text_encoder.train or entries)
        self.installed: list[embeddings.Embedding] = []

    def prepare(self, total_steps: int):
        """Load the text encoder, add the embeddings' tokens, and make the optimizer of what trains here: an
        ExpertTraining named `text_encoder` (None when the text side is frozen and comes from the cache)."""
        if not self.live:
            return None
        encoders = self.family.text_encoders()
        self.installed = [embeddings.install(self.family, entry) for entry in self.entries]
        for entry in self.entries:
            if entry.train and not any(entry.placeholder in text for text in self.cached):
                log.warning("no caption contains the placeholder %r, so its embedding gets nothing to learn from; "
                            "write it in the captions of the clips it should learn", entry.placeholder)
        self.family._motiontune_embeddings = self.installed
        groups, trained_encoders, vectors = [], {}, {}
        lr = self.config.embedding_learning_rate or self.config.learning_rate
        for index, embedding in enumerate(self.installed):
            for key, tensor in embedding.vectors.items():
                vectors[f"{index}_{key}"] = tensor
            params = [v for v in embedding.vectors.values() if v.requires_grad]
            if params:
                groups.append({"params": params, "lr": lr, "name": f"embedding {embedding.config.placeholder}"})
        if self.config.text_encoder.train:
            lr = self.config.text_encoder.learning_rate or self.config.learning_rate
            for key, (_, encoder) in encoders.items():
                table = encoder.get_input_embeddings()
                table = getattr(table, "table", table)
                # The token table (250k x 4096 for UMT5-XXL) stays frozen: only rows of words in the captions would
                # learn, weight decay would still shrink all of them, and its AdamW state alone would be 8 GB.
                params = [p for p in encoder.parameters() if p is not table.weight and not any(p is v for v in vectors.values())]
                for p in params:
                    p.requires_grad_(True)
                groups.append({"params": params, "lr": lr, "name": f"text encoder {key}"})
                trained_encoders[key] = encoder
        if not groups:
            return None  # embeddings used as they are (train: false): live, but nothing trains
        optimizer = make_optimizer(groups, self.config)
        parts = TextParts(trained_encoders, vectors)
        count = sum(p.numel() for g in groups for p in g["params"])
        log.info("text side: %s; %s trained parameters, AdamW state %.2f MB (two float32 values each)",
                 ", ".join(f"{g['name']} at lr {g['lr']:g}" for g in groups), f"{count:,}", count * 8 / 1e6)
        return ExpertTraining(Expert(NAME, NAME, parts, (0.0, 1.0)), [p for g in groups for p in g["params"]],
                              optimizer, make_scheduler(optimizer, self.config, total_steps), text_side=True)

    def batch(self, captions: list[str], device: torch.device) -> torch.Tensor:
        """The captions' text embeddings: cached, or encoded now with gradients (each distinct caption once)."""
        if not self.live:
            return torch.stack([self.cached[c] for c in captions]).to(device)
        distinct = sorted(set(captions))
        encoded = self.family.encode_prompts([self.expand(c) for c in distinct], grad=True)
        return encoded[[distinct.index(c) for c in captions]].to(device)

    def expand(self, text: str) -> str:
        for embedding in self.installed:
            text = embedding.expand(text)
        return text

    @torch.no_grad()
    def refresh_samples(self, requests, samples) -> None:
        """Sample prompts encoded again with the text side as it is now (cached ones predate the training)."""
        if not self.live:
            return
        for (request, _), sample in zip(requests, samples):
            request.prompt_embeds = self.family.encode_prompts([self.expand(sample.prompt)])
            if request.negative_prompt_embeds is not None:
                request.negative_prompt_embeds = self.family.encode_prompts([self.expand(sample.negative_prompt)])
