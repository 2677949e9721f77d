"""Any JSON either loads as a config or gives one clear ConfigError; never a traceback."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from motiontune.config import ConfigError
from motiontune.configure import load_config
from motiontune.config.schema import TrainConfig

KEYS = sorted(TrainConfig.model_fields) + ["__version", "video_config", "path", "prompt", "train", "text", "max_frames"]
scalars = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True) | st.text(max_size=12)
values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
configs = st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=10), values, max_size=8)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=configs | values)
def test_any_json_loads_or_gives_a_config_error(tmp_path, document):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(document))
    try:
        config = load_config(str(path))
    except ConfigError as error:
        message = str(error)
        assert message.startswith(str(path)) and "Traceback" not in message
    else:
        assert isinstance(config, TrainConfig)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=40))
def test_any_text_file_gives_a_config_error_or_loads(tmp_path, text):
    path = tmp_path / "config.json"
    path.write_text(text)
    try:
        load_config(str(path))
    except ConfigError:
        pass
