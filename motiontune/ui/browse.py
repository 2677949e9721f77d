"""The path pickers' listing: the folders and files inside the folders the UI may browse (`motiontune ui --browse
DIR`, by default the folder it was started in and its workspace). Names only, never contents; `..`, absolute paths
and symlinks that lead out of those folders are refused or left out, as the file server refuses them."""

from __future__ import annotations

from pathlib import Path

from fastapi import HTTPException

MOST_ENTRIES = 500  # a folder of 100,000 frames lists its first 500 (by name) and says so


def listing(roots: list[Path], path: str) -> dict:
    """`path` empty: the roots themselves. Otherwise the folder's entries, folders first, hidden files left out."""
    if not path:
        return {"path": None, "parent": None, "more": 0,
                "entries": [{"name": str(root), "path": str(root), "folder": True} for root in roots]}
    folder = Path(path).expanduser().resolve()
    root = next((r for r in roots if folder.is_relative_to(r)), None)
    if root is None:
        shown = ", ".join(str(r) for r in roots)
        raise HTTPException(403, f"{path} is outside the folders this UI may browse ({shown}); type the path, or start "
                                 "`motiontune ui --browse DIR` to browse another folder")
    if not folder.is_dir():
        raise HTTPException(404, f"{path}: no such folder")
    entries = []
    for child in sorted(folder.iterdir(), key=lambda c: (not c.is_dir(), c.name.lower())):
        if child.name.startswith(".") or not any(child.resolve().is_relative_to(r) for r in roots):
            continue  # hidden, or a symlink that leads out of the browsable folders
        entries.append({"name": child.name, "path": str(child), "folder": child.is_dir()})
    return {"path": str(folder), "parent": None if folder == root else str(folder.parent),
            "entries": entries[:MOST_ENTRIES], "more": max(0, len(entries) - MOST_ENTRIES)}
