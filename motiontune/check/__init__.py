"""`motiontune check`: a dry run of a config's real code path on a fake CUDA device, before the first GPU run.

- runtime.py: the fake CUDA device on a CPU-only PyTorch (a small C++ library, CUDA API stand-ins), and what it cannot check;
- watch.py: what the run watches for (a CPU tensor meeting a CUDA one, a CPU generator for CUDA noise, a saved tensor
  left on the device), each reported with the module and the tensors' origins;
- parts.py: the model's parts built from the released configs, no weights;
- run.py: the stages, each the run's own code; child.py: the process they run in; report.py: the printed report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def check(config: str, overrides: list[str] = (), gpu_gb: float = 24.0, before: list[str] = ()) -> dict:
    """Dry-run `config` (a file or preset name) in a process of its own; → the result (run.py's `dry_run`)."""
    return check_several([(config, list(overrides))], gpu_gb, before)[0]


def check_several(runs: list, gpu_gb: float = 24.0, before: list[str] = ()) -> list[dict]:
    """Dry-run each (config, overrides) one after another in one process of its own (its start-up paid once). A run may
    be a dict instead: {"config", "overrides", "gpu_gb"}, with a card size of its own."""
    from .runtime import DryRunError, guard_library

    library = guard_library()
    with tempfile.TemporaryDirectory(prefix="motiontune-check-") as folder:
        request, result = Path(folder) / "request.json", Path(folder) / "result.json"
        request.write_text(json.dumps({"runs": [{"overrides": [], **r} if isinstance(r, dict) else {"config": r[0], "overrides": list(r[1])}
                                                for r in runs], "gpu_gb": gpu_gb,
                                       "library": str(library) if library else None, "result": str(result),
                                       "before": list(before)}))
        env = dict(os.environ, HF_HUB_OFFLINE="1")  # nothing is downloaded: configs are the released ones
        done = subprocess.run([sys.executable, "-m", "motiontune.check.child", str(request)], env=env,
                              capture_output=True, text=True)
        if done.returncode != 0 or not result.is_file():
            raise DryRunError(f"the dry run's process failed:\n{done.stderr[-4000:]}")
        return json.loads(result.read_text())
