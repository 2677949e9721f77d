"""What a wheel ships: a user who installs motiontune from one gets the presets, the demo clips, the web UI and
its help for each key, read from the installed package rather than from a source checkout."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_a_wheel_carries_everything_the_installed_package_reads(tmp_path):
    listed = subprocess.run(["git", "-c", f"safe.directory={REPO}", "ls-files", "-z"], cwd=REPO, capture_output=True)
    if listed.returncode != 0:
        pytest.skip(f"no file list from git here ({listed.stderr.decode().strip()}): the tracked files to build from are unknown")
    source = tmp_path / "source"  # the tracked files only, as a clean clone has them
    for name in filter(None, listed.stdout.decode().split("\0")):
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    # as `python -m build` does it: an sdist from the tree, then the wheel from the unpacked sdist
    sdist = subprocess.run([sys.executable, "-c", "from setuptools import build_meta; print(build_meta.build_sdist('sdist'))"],
                           cwd=source, capture_output=True, text=True)
    assert sdist.returncode == 0, sdist.stderr
    archive = source / "sdist" / sdist.stdout.split()[-1]
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "dist"), str(archive)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    [wheel] = (tmp_path / "dist").glob("motiontune-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for wanted in ("motiontune/config/presets/#wan 2.2 LoRA.json", "motiontune/ui/static/index.html",
                   "motiontune/ui/config.md", "motiontune/cli.py"):
        assert wanted in names, f"{wanted} is missing from the wheel"
    assert any(n.startswith("motiontune/demo/clips/") for n in names)
    assert any(n.startswith("motiontune/models/releases/") for n in names)

    installed = tmp_path / "installed"
    zipfile.ZipFile(wheel).extractall(installed)
    probe = ("from motiontune.ui.schema_help import DOCS, docs_help\n"
             "print(DOCS); print(len(docs_help()))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(installed), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    docs_path, help_rows = out.stdout.split()
    from motiontune.ui.schema_help import docs_help

    assert Path(docs_path) == installed / "motiontune" / "ui" / "config.md"  # read from the package, not a checkout
    assert int(help_rows) == len(docs_help()) > 100  # every key's help, as in the source checkout
