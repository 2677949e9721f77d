"""`estimate`'s figures kept on disk between processes (motiontune/util/sim_cache.py): a later process reads what an
earlier one simulated and gets the same figures, and a changed program, a damaged file or the cache switched off
simulates again. Costs are counted in fake ops (models/fake_memory.py), never timed."""

from __future__ import annotations

import pytest

from motiontune.configure import load_config
from motiontune.estimate import estimate, make_shape
from motiontune.models.fake_memory import LiveBytes
from motiontune.util import sim_cache


def forget():
    """A new process: every in-process cache of the estimate emptied."""
    from motiontune.estimate import moments, simulation, weights
    from motiontune.models import fake_memory, wan_decode

    for kept in (simulation._STEPS, simulation._MATMULS, simulation._RECEIVED, simulation._DENOISE, weights._WEIGHTS,
                 weights._BUILT, weights._STATE, moments._TEXT, moments._ENCODERS, fake_memory._NO_GRAD,
                 wan_decode._DECODE):
        kept.clear()


def figures_and_ops(config, shape):
    forget()
    before = LiveBytes.all_ops
    result = estimate(config, shape=shape, device="cpu")
    return [(line.name, line.device, line.host, line.note) for line in result.lines], LiveBytes.all_ops - before


@pytest.fixture
def small():
    config = load_config("#wan 2.1 LoRA")
    return config, make_shape(config, 1, 9, 128, 128)


def test_a_later_process_reads_the_figures_an_earlier_one_simulated(small, tmp_path, monkeypatch):
    monkeypatch.setenv(sim_cache.ENV, str(tmp_path))
    first, simulated = figures_and_ops(*small)
    assert simulated > 0 and list(tmp_path.glob("step-*.json")) and list(tmp_path.glob("weights-*.json"))
    again, ops = figures_and_ops(*small)
    assert again == first and ops == 0  # nothing simulated: every figure read back, and the same

    monkeypatch.setattr(sim_cache, "fingerprint", lambda: "another program")  # changed code or libraries
    changed, ops = figures_and_ops(*small)
    assert changed == first and ops == simulated

    for path in tmp_path.glob("step-*.json"):
        path.write_text("{\"peak\": ")  # a file cut short (a full disk): simulated again, and rewritten
    damaged, ops = figures_and_ops(*small)
    assert damaged == first and ops == simulated
    assert figures_and_ops(*small) == (first, 0)


def test_the_cache_switched_off_writes_nothing(small, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv(sim_cache.ENV, "off")
    _, simulated = figures_and_ops(*small)
    assert simulated > 0 and not any(tmp_path.rglob("*.json"))
