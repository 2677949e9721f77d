"""The process a dry run runs in: `python -m motiontune.check.child REQUEST.json`. The fake CUDA library must be loaded
before torch is imported (runtime.py), hence a process of its own. REQUEST: {"runs": [{"config",
"overrides"}, ...], "gpu_gb", "library", "result", "before"} (the result: one per run); "before" names functions ("module:function") called first: tests plant bugs with it."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    request = json.loads(Path(argv[0]).read_text())
    from .runtime import preload

    if request.get("library"):
        preload(request["library"])
    import logging

    logging.getLogger("motiontune").setLevel(logging.WARNING)
    for name in request.get("before", []):
        module, _, function = name.partition(":")
        getattr(importlib.import_module(module), function)()
    from ..configure import load_config
    from .run import dry_run

    runs = request.get("runs") or [request]  # one run: {"config", "overrides"} at the top
    results = [dry_run(load_config(run["config"], run.get("overrides", [])), run.get("gpu_gb", request.get("gpu_gb", 24.0)))
               for run in runs]  # a run's own gpu_gb, else the request's
    Path(request["result"]).write_text(json.dumps(results if "runs" in request else results[0], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
