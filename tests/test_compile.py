"""`compile`: each transformer block through torch.compile (the CPU's inductor backend here) trains as the
uncompiled model does."""

from __future__ import annotations

import pytest
import torch

from conftest import base_config, write_config
from motiontune.cli import main
from motiontune.configure import load_config


def losses(workspace) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(workspace / "tensorboard"))
    events.Reload()
    return {e.step: e.value for e in events.Scalars("loss")}


def test_compiled_blocks_train_as_the_uncompiled_ones(tmp_path, tiny_models, dataset):
    """Three steps with gradient checkpointing, compiled and not: the same losses. One clip, so one latent shape
    and one compiled graph (compiling on the CPU takes most of this test's time)."""
    import torch._dynamo

    (dataset / "big_buck_bunny_432_433.webm").unlink()
    runs = {}
    for compiled in (False, True):
        folder = tmp_path / f"compile-{compiled}"
        config = base_config(folder, tiny_models("wan-2.1"), dataset, epochs=3, compile=compiled, gradient_checkpointing="ON")
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        assert main(["train", "--config", str(write_config(tmp_path / f"{compiled}.json", **config))]) == 0
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert (graphs > 0) == compiled  # compiled blocks went through dynamo; the uncompiled run did not
        runs[compiled] = losses(folder / "workspace")
    assert len(runs[False]) >= 3 and runs[True].keys() == runs[False].keys()
    for step, loss in runs[False].items():
        assert runs[True][step] == pytest.approx(loss, rel=1e-3), step


def test_compile_with_layer_offloading_is_refused_by_name(tmp_path):
    config = write_config(tmp_path / "c.json", compile=True, layer_offload_fraction=0.5, concepts=[{"path": str(tmp_path)}])
    with pytest.raises(Exception, match="compile = true with layer offloading"):
        load_config(str(config))
