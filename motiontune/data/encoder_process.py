"""Filling the cache: what `motiontune cache` does, and what `motiontune train` has done in a child process of its own
when something is missing, so the training process never holds the VAE or the text encoders (its peak is the step's,
not the encoders' plus the step's: the memory an allocator once gave a process is rarely handed back).

The child runs `fill_cache`, the same code as `motiontune cache`, and reports what it encoded in a small JSON file;
its log lines (a clip skipped, and why) go to the same terminal. A clip it could not encode is skipped by the
training process too; an error that stops it stops training with its message."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import traceback
from collections import Counter
from pathlib import Path

from ..config import TrainConfig
from ..util.peak_rss import mb, own_peak_rss

log = logging.getLogger("motiontune")

#: set by torchrun for the training processes; the encoding process is a plain single process
_TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                       "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


#: "module:function" names the child calls before it starts (tests plant a failing clip with it, as check's child)
BEFORE: list[str] = []


class EncoderProcessError(RuntimeError):
    """The process that encodes clips stopped with an error."""


def fill_cache(config: TrainConfig, family, share: tuple[int, int] | None = None):
    """Every clip window a run's epochs train and every text it needs, encoded into the cache where missing; →
    the Encoding (its `calls`, `used`). `share`: (rank, world size) of an encoding process under torchrun."""
    from ..sample import sample_prompts
    from .cache import Cache
    from .latents import Encoding
    from .survey import survey_dataset

    survey = survey_dataset(config, family)
    encoding = Encoding(family, config, Cache(config.cache_dir, enabled=True), share=share)
    variants = sorted({encoding.window_variant(epoch) for epoch in range(config.epochs)})
    for variant in variants:
        encoding.clips(survey, variant)
    dropout = {""} if config.text_encoder.dropout_probability > 0 else set()
    # every usable file's captions, not only those of the clips this process encoded: processes sharing the work
    # (`share`) each deal the same texts
    captions = {c for entry in survey.usable for c in encoding.captions(entry.item)}
    encoding.texts(captions | sample_prompts(config) | dropout)
    return encoding


def encode_in_child(config: TrainConfig, device, share: tuple[int, int] | None = None) -> tuple[Counter, int | None]:
    """Run `fill_cache` in a new Python process on `device`; → what it encoded (`Encoding.calls`) and the child's own
    resident peak in bytes (util/peak_rss.py; None where the system does not say)."""
    with tempfile.TemporaryDirectory(prefix="motiontune-encode-") as folder:
        request, result = Path(folder) / "request.json", Path(folder) / "result.json"
        request.write_text(json.dumps({"config": json.loads(config.model_dump_json(by_alias=True)), "device": str(device),
                                       "share": list(share) if share else None, "result": str(result), "before": BEFORE,
                                       "level": logging.getLogger("motiontune").getEffectiveLevel()}))
        env = {k: v for k, v in os.environ.items() if k not in _TORCHRUN_VARIABLES}
        if share:
            log.info("encoding this rank's share of the missing clips and texts in a separate process")
        else:
            log.info("encoding the missing clips and texts in a separate process (the training process never loads "
                     "the VAE or the text encoders for them)")
        # stdout and stderr are the terminal's: the child's progress and warnings show as they happen
        done = subprocess.run([sys.executable, "-m", "motiontune.data.encoder_process", str(request)], env=env)
        answer = json.loads(result.read_text()) if result.is_file() else {}
    if done.returncode != 0 or "calls" not in answer:
        what = answer.get("error") or f"it exited with code {done.returncode} and said nothing more (killed? out of memory?)"
        from ..config import ConfigError
        from ..models import ModelLoadError
        from .video import MediaError

        for kind in (ModelLoadError, MediaError, ConfigError):  # the errors train reports with their own exit codes
            if answer.get("kind") == kind.__name__:
                raise kind(f"(in the encoding process) {what}")
        raise EncoderProcessError(f"encoding clips for training failed in the encoding process: {what}. Its messages "
                                  "are above; `motiontune cache --config ...` runs the same encoding on its own "
                                  "(set encode_in_child false to encode in the training process)")
    peak = answer.get("peak_rss")
    log.info("the encoding process is done; its own peak resident memory: %s", mb(peak))
    return Counter(answer["calls"]), peak


def main(argv: list[str]) -> int:
    request = json.loads(Path(argv[0]).read_text())
    result = Path(request["result"])
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[motiontune encode] %(message)s"))
    logger = logging.getLogger("motiontune")
    logger.addHandler(handler)
    logger.setLevel(request.get("level", logging.INFO))
    try:
        import importlib

        import torch

        for name in request.get("before", []):
            module, _, function = name.partition(":")
            getattr(importlib.import_module(module), function)()

        from ..configure import parse_config
        from ..models import family_for

        config = parse_config(request["config"], Path(argv[0]))
        family = family_for(config, torch.device(request["device"]))
        share = tuple(request["share"]) if request.get("share") else None
        encoding = fill_cache(config, family, share)
    except Exception as error:
        frames = [f for f in traceback.extract_tb(error.__traceback__) if "/motiontune/" in f.filename]
        where = f" (at {frames[-1].filename.split('/motiontune/', 1)[-1]}:{frames[-1].lineno})" if frames else ""
        named = type(error).__name__ in ("ModelLoadError", "MediaError", "ConfigError")  # their own words suffice
        result.write_text(json.dumps({"error": str(error) if named else f"{type(error).__name__}: {error}{where}",
                                      "kind": type(error).__name__}))
        logger.error("%s: %s", type(error).__name__, error, exc_info=logger.isEnabledFor(logging.DEBUG))
        return 1
    result.write_text(json.dumps({"calls": dict(encoding.calls), "peak_rss": own_peak_rss()}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
