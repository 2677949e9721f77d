"""Training methods: what trains and how it is saved. Each module is a `TrainingMethod` (base.py)."""

from . import embedding, finetune, lora
from .base import TrainingMethod

METHODS: dict[str, TrainingMethod] = {"LORA": lora, "FINE_TUNE": finetune, "EMBEDDING": embedding}
