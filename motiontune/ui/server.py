"""The web app behind `motiontune ui`: a JSON API over the config schema, validation, `inspect`, and a
training run (a `motiontune train` subprocess, or any run's workspace), plus the page's own static files.

Files are served only from inside the watched workspace and the output folder of the config in use
(resolved, so `..`, absolute paths and symlinks that lead elsewhere are refused). Requests whose Host or
Origin is not this server's are refused, so another web page in the browser cannot drive it.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import sys
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import Body, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from ..config import ConfigError, TrainConfig, list_presets
from ..config.load import PRESETS_DIR, apply_override
from ..configure import keys_that_do_not_apply
from ..util.files import write_then_rename
from .browse import listing
from .checks import MEDIA, path_problems, validate, warnings
from .queue import JobQueue
from .runs import Runs, read_json
from .schema_help import ui_schema

__all__ = ["create_app", "run_server", "validate"]

STATIC = Path(__file__).parent / "static"
LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1"}
WORKING_CONFIG = "ui-working.json"  # the form as last edited, so a reload (or a restart) shows it again
THUMB_HEIGHT = 72
MAX_THUMB_CLIPS = 4  # clips per file shown (first/middle/last frame each)

log = logging.getLogger("motiontune")


# ---------------------------------------------------------------------------------------------- dataset

def _jpeg_data_uri(array) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def thumbnails(entry) -> list[list[str]]:
    """First, middle and last frame of each planned clip, at the clip's bucket aspect (cropped as trained)."""
    from ..data.video import decode_clips

    if not entry.usable or not entry.clips:
        return []
    height, width = entry.size
    size = (THUMB_HEIGHT, max(1, round(THUMB_HEIGHT * width / height)))
    picks = [(clip[0], clip[len(clip) // 2], clip[-1]) for clip in entry.clips[:MAX_THUMB_CLIPS]]
    return [[_jpeg_data_uri(frame) for frame in frames] for frames in decode_clips(entry.info, picks, size)]


def inspect_report(config: TrainConfig) -> dict:
    from ..data.survey import survey_dataset
    from ..inspect import file_record, summary_record
    from ..models import family_for

    survey = survey_dataset(config, family_for(config, None), require_usable=False)
    files = []
    for entry in survey.entries:
        record = file_record(entry)
        record["name"] = entry.item.path.name
        caption_file = entry.item.path.with_suffix(".txt")
        record["caption_file"] = str(caption_file)
        try:
            record["caption_text"] = caption_file.read_text(encoding="utf-8-sig") if caption_file.is_file() else ""
        except (OSError, UnicodeDecodeError):
            record["caption_text"] = None  # not text this page can edit; the problems column says why
        try:
            record["thumbnails"] = thumbnails(entry)
        except Exception as error:  # a file that probes but will not decode: say so, keep the report
            record["thumbnails"] = []
            record["problems"].append(f"thumbnails: {type(error).__name__}: {error}")
        files.append(record)
    return {"files": files, "summary": summary_record(survey)}


# ---------------------------------------------------------------------------------------------- memory advice

def estimate_panel(data: dict, gpu_gb: float) -> dict:
    """`motiontune estimate` for the config as edited: the training step's peak on the device, whether it fits a
    card of `gpu_gb`, and the cheapest changes that make it fit, each as the config it makes (applied in one click)."""
    from ..estimate import GB, EstimateError, cheapest_changes, estimate

    config, errors = validate(data)
    if config is None or errors:
        raise HTTPException(422, "fix the config's problems first: " + "; ".join(e["msg"] for e in errors[:3]))
    try:
        result = estimate(config)
        budget = int(gpu_gb * GB)
        changes = [] if result.fits(budget) else cheapest_changes(config, budget)
    except EstimateError as error:
        raise HTTPException(400, str(error)) from None
    suggestions = []
    for change in changes:
        changed = json.loads(json.dumps(data))
        for assignment in change.overrides:
            apply_override(changed, assignment)
        suggestions.append({"change": change.describe(), "set": change.overrides, "device_gb": change.estimate.device / GB,
                            "config": changed})
    return {"gpu_gb": gpu_gb, "device_gb": result.device / GB, "host_gb": result.host / GB,
            "usable_gb": result.usable(budget) / GB, "fits": result.fits(budget), "shape": result.shape.describe(),
            "lines": [{"name": line.name, "device_gb": line.device / GB, "note": line.note} for line in result.lines],
            "changes": suggestions}


# ---------------------------------------------------------------------------------------------- app

def _host_name(netloc: str) -> str:
    return (urlsplit(f"//{netloc}").hostname or "").lower()


def create_app(workspace: str | Path | None = None, allowed_hosts: set[str] | None = LOOPBACK_NAMES,
               browse: list[str | Path] | None = None) -> FastAPI:
    """`workspace`: a run's workspace to show at once, and where the working config is kept (default
    ./workspace). `allowed_hosts`: names the Host header may carry (None: any, when bound to a non-loopback
    address). `browse`: the folders the path pickers may list (default: the current folder and the workspace)."""
    app = FastAPI(title="motiontune ui", docs_url=None, redoc_url=None, openapi_url=None)
    home = Path(workspace).expanduser().resolve() if workspace else Path("workspace").resolve()
    roots = [Path(f).expanduser().resolve() for f in browse] if browse else [Path.cwd().resolve(), home]
    roots = [r for r in dict.fromkeys(roots) if not any(r != o and r.is_relative_to(o) for o in roots)]
    runs = Runs(home)
    if workspace is not None:
        runs.watch(Path(workspace))
    app.state.run = runs
    queue = app.state.queue = JobQueue(runs, home)

    @app.middleware("http")
    async def same_origin_only(request: Request, call_next):
        host = request.headers.get("host", "")
        if allowed_hosts is not None and _host_name(host) not in allowed_hosts:
            return JSONResponse({"detail": f"host {host!r} not served"}, status_code=403)
        origin = request.headers.get("origin")
        if origin and origin != "null" and urlsplit(origin).netloc.lower() != host.lower():
            return JSONResponse({"detail": "cross-origin request refused"}, status_code=403)
        if request.method not in ("GET", "HEAD") and not request.headers.get("content-type", "").startswith("application/json"):
            return JSONResponse({"detail": "send JSON (Content-Type: application/json)"}, status_code=415)
        return await call_next(request)

    @app.get("/")
    def index():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # ------------------------------------------------------------------------------------------ config

    @app.get("/api/schema")
    def schema():
        return ui_schema()

    @app.get("/api/presets")
    def presets():
        return {"presets": list_presets()}

    @app.get("/api/presets/{name}")
    def preset(name: str):
        if name not in list_presets():
            raise HTTPException(404, f"no preset {name!r}")
        return {"name": name, "config": json.loads((PRESETS_DIR / f"{name}.json").read_text())}

    @app.post("/api/validate")
    def validate_config(config=Body(..., embed=True)):
        parsed, errors = validate(config)
        paths = path_problems(config) if isinstance(config, dict) else []
        return {"ok": not errors and not paths, "errors": errors + [p for p in paths if p not in errors],
                "warnings": warnings(parsed),
                # what the chosen model type and method never read: the form hides these while they are unset
                "not_applicable": keys_that_do_not_apply(parsed) if parsed else {}}

    @app.get("/api/browse")
    def browse_folder(path: str = ""):
        return listing(roots, path)

    @app.get("/api/working")
    def working():
        """The form as it was last edited (kept in the UI's workspace, so a reload mid-run shows it again)."""
        return read_json(home / WORKING_CONFIG) or {"config": None}

    @app.put("/api/working")
    def keep_working(config=Body(...), source: str = Body(""), save_path: str = Body("")):
        if not isinstance(config, dict):
            raise HTTPException(400, "the config must be a JSON object")
        home.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"config": config, "source": source, "save_path": save_path}, indent=1)
        write_then_rename(home / WORKING_CONFIG, lambda partial: partial.write_text(text))
        return {"kept": str(home / WORKING_CONFIG)}

    @app.post("/api/config/load")
    def load_file(path: str = Body(..., embed=True)):
        file = Path(path).expanduser()
        if file.suffix.lower() != ".json":
            raise HTTPException(400, "a config is a .json file")
        if not file.is_file():
            raise HTTPException(404, f"{file}: no such file")
        try:
            data = json.loads(file.read_text(encoding="utf-8-sig"))
        except (ValueError, UnicodeDecodeError) as error:
            raise HTTPException(400, f"{file}: not valid JSON ({error})") from None
        if not isinstance(data, dict):
            raise HTTPException(400, f"{file}: the config must be a JSON object")
        return {"path": str(file.resolve()), "config": data}

    @app.post("/api/config/save")
    def save_file(path: str = Body(...), config=Body(...)):
        file = Path(path).expanduser()
        if file.suffix.lower() != ".json":
            raise HTTPException(400, "save the config as a .json file")
        if not isinstance(config, dict):
            raise HTTPException(400, "the config must be a JSON object")
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        _, errors = validate(config)
        return {"path": str(file.resolve()), "ok": not errors, "errors": errors}

    @app.post("/api/estimate")
    def memory_estimate(config=Body(...), gpu_gb: float = Body(24.0)):
        if not isinstance(config, dict):
            raise HTTPException(400, "the config must be a JSON object")
        if not 0 < gpu_gb <= 4096:
            raise HTTPException(400, "the card's memory is a number of GB above 0")
        return estimate_panel(config, gpu_gb)

    # ------------------------------------------------------------------------------------------ dataset

    @app.post("/api/inspect")
    def inspect_dataset(config=Body(None), folder: str | None = Body(None)):
        from ..data.video import MediaError

        if folder:
            if not Path(folder).expanduser().is_dir():
                raise HTTPException(404, f"{folder}: no such folder")
            data = {**(config if isinstance(config, dict) else {}),
                    "concepts": [{"path": str(Path(folder).expanduser()), "include_subdirectories": True}]}
            data.pop("concept_file_name", None)
        else:
            data = config
        parsed, errors = validate(data)
        if parsed is None or errors:
            return JSONResponse({"detail": "the config is not valid", "errors": errors}, status_code=422)
        try:
            return inspect_report(parsed)
        except (ConfigError, MediaError) as error:
            raise HTTPException(400, str(error)) from None

    @app.post("/api/caption")
    def write_caption(file: str = Body(...), text: str = Body(...)):
        """A media file's caption (`<name>.txt` beside it), as edited on the Dataset page."""
        media = Path(file).expanduser().resolve()
        if media.suffix.lower() not in MEDIA or not media.is_file():
            raise HTTPException(400, f"{file}: not a video or image file of a dataset")
        caption = media.with_suffix(".txt")
        caption.write_text(text.strip() + "\n", encoding="utf-8")
        return {"path": str(caption), "caption": text.strip()}

    # ------------------------------------------------------------------------------------------ runs

    def folder_of(path: str | None) -> Path | None:
        if not path:
            return None
        folder = Path(path).expanduser().resolve()
        if not folder.is_dir():
            raise HTTPException(404, f"{path}: no such run folder")
        return folder

    @app.post("/api/train/start")
    def start(config=Body(..., embed=True)):
        parsed, errors = validate(config)
        errors = errors + (path_problems(config) if isinstance(config, dict) else [])
        if errors or parsed is None:
            return JSONResponse({"detail": "the config is not valid", "errors": errors}, status_code=422)
        return runs.start(config, parsed.workspace_dir)

    # ------------------------------------------------------------------------------------------ the job queue

    @app.get("/api/queue")
    def queued():
        return {"jobs": queue.listing()}

    @app.post("/api/queue")
    def enqueue(config=Body(...), name: str = Body("")):
        parsed, errors = validate(config)
        errors = errors + (path_problems(config) if isinstance(config, dict) else [])
        if errors or parsed is None:
            return JSONResponse({"detail": "the config is not valid", "errors": errors}, status_code=422)
        return queue.add(config, parsed.workspace_dir, name)

    @app.post("/api/queue/cancel")
    def cancel_job(id: str = Body(..., embed=True)):
        return queue.cancel(id)

    @app.post("/api/queue/move")
    def move_job(id: str = Body(...), offset: int = Body(...)):
        return queue.move(id, offset)

    @app.post("/api/train/stop")
    def stop(path: str | None = Body(None, embed=True)):
        return runs.stop(folder_of(path))

    @app.post("/api/runs/resume")
    def resume(path: str = Body(..., embed=True)):
        return runs.resume(folder_of(path))

    @app.post("/api/runs/ask")
    def ask(path: str = Body(...), action: str = Body(...)):
        return runs.ask(folder_of(path), action)

    @app.post("/api/runs")
    def list_runs(workspace: str = Body(..., embed=True)):
        folder = Path(workspace).expanduser().resolve()
        if not folder.is_dir():
            return {"workspace": str(folder), "runs": []}
        runs.serve(folder)
        return {"workspace": str(folder), "runs": runs.list(folder)}

    @app.post("/api/watch")
    def watch(workspace: str = Body(..., embed=True)):
        if not Path(workspace).expanduser().is_dir():
            raise HTTPException(404, f"{workspace}: no such folder")
        shown = runs.watch(Path(workspace))
        return {"workspace": str(shown)}

    @app.get("/api/run")
    def run(path: str | None = None):
        return runs.status(folder_of(path))

    # ------------------------------------------------------------------------------------------ files

    def serve(candidate: Path) -> FileResponse:
        try:
            resolved = candidate.resolve()
        except (OSError, RuntimeError):
            raise HTTPException(404, "not found") from None
        if not any(resolved.is_relative_to(root) for root in runs.served):
            raise HTTPException(403, "outside the workspace and output folders")
        if not resolved.is_file():
            raise HTTPException(404, "not found")
        # inline (a sample plays in the page), but saved under its own name: /api/file?path=... was saved as "file"
        return FileResponse(resolved, filename=resolved.name, content_disposition_type="inline")

    @app.get("/files/{path:path}")
    def workspace_file(path: str):
        """A file of the shown run, by its path inside it."""
        if runs.current is None:
            raise HTTPException(404, "no workspace is watched")
        return serve(runs.current / path)

    @app.get("/api/file")
    def any_file(path: str):
        """A file by absolute path (or relative to the shown run), inside a served workspace or output folder."""
        base = runs.current or Path.cwd()
        return serve(base / Path(path).expanduser())

    return app


def is_loopback(host: str) -> bool:
    import ipaddress

    if host.lower() in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, explicit: bool) -> bool:
    """True for a loopback address. Another address only when asked for explicitly (--host), with a warning."""
    if is_loopback(host):
        return True
    if not explicit:  # unreachable from the CLI (the default is loopback); a guard for other callers
        raise ValueError(f"refusing to bind {host}, a non-loopback address that was not asked for with --host")
    print(f"WARNING: motiontune ui is listening on {host}, reachable from other machines. It has no login: anyone "
          "who can reach this port can read the workspace, write config files and start training.", file=sys.stderr)
    return False


def run_server(host: str | None, port: int, workspace: str | None = None, browse: list[str] | None = None) -> None:
    """`host` None: 127.0.0.1. A non-loopback address is bound only when given explicitly, with a warning."""
    import uvicorn

    explicit = host is not None
    host = host or "127.0.0.1"
    loopback = check_bind(host, explicit)
    # loopback: only requests naming this machine (DNS rebinding); otherwise any name the machine is reached by
    allowed = LOOPBACK_NAMES | {host.strip("[]").lower()} if loopback else None
    app = create_app(workspace, allowed_hosts=allowed, browse=browse)
    shown = f"[{host}]" if ":" in host else host
    print(f"motiontune ui: http://{shown}:{port}/  (Ctrl-C to quit; a run started here keeps going)", file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level="warning")
