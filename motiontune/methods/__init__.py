"""Training methods: what trains and how it is saved. Each module has `prepare(family, expert, config)`
(make the expert's trainable parameters, return them) and `save(family, config, destination)`."""

from . import embedding, finetune, lora

METHODS = {"LORA": lora, "FINE_TUNE": finetune, "EMBEDDING": embedding}
