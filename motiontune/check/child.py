"""The process a dry run runs in: `python -m motiontune.check.child REQUEST.json`. The fake CUDA library must be loaded
before torch is imported (runtime.py), hence a process of its own. REQUEST: {"config", "overrides", "gpu_gb",
"library", "result", "before"}; "before" names functions ("module:function") called first: tests plant bugs with it."""

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

    config = load_config(request["config"], request.get("overrides", []))
    result = dry_run(config, request.get("gpu_gb", 24.0))
    Path(request["result"]).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
