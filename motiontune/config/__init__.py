from .load import ConfigError, find_config_file, list_presets, load_config
from .schema import TrainConfig, parse_resolution

__all__ = ["ConfigError", "TrainConfig", "find_config_file", "list_presets", "load_config", "parse_resolution"]
