from .load import ConfigError, find_config_file, list_presets, read_config
from .schema import TrainConfig, parse_resolution

__all__ = ["ConfigError", "TrainConfig", "find_config_file", "list_presets", "parse_resolution", "read_config"]
