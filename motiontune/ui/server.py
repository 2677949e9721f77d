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
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import Body, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError

from ..config import ConfigError, TrainConfig, list_presets
from ..config.load import PRESETS_DIR
from ..configure import check_config
from ..configure import validate as validate_schema
from ..util.processes import process_alive
from ..train.progress import FILE_NAME as PROGRESS_FILE
from .schema_help import ui_schema

STATIC = Path(__file__).parent / "static"
LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1"}
UI_CONFIG = "ui-config.json"  # the config a UI-started run trains with, in its workspace
UI_LOG = "ui-train.log"  # that run's output
THUMB_HEIGHT = 72
MAX_THUMB_CLIPS = 4  # clips per file shown (first/middle/last frame each)

log = logging.getLogger("motiontune")


# ---------------------------------------------------------------------------------------------- validation

def _field_loc(loc: tuple, data, missing: bool) -> str:
    """pydantic's error location cut to the field the user edits (union branch tags such as
    `constrained-float` dropped); empty for a whole-config problem."""
    parts, node = [], data
    for index, part in enumerate(loc):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        elif missing and index == len(loc) - 1 and isinstance(node, dict):
            pass  # a required key that is absent: it is still the field
        else:
            break
        parts.append(str(part))
    return ".".join(parts)


_PROBLEM_KEY = re.compile(r"^\s*-\s+([A-Za-z_0-9.\[\]]+)")


def validate(data) -> tuple[TrainConfig | None, list[dict]]:
    """The same checks as `load_config`: the schema, then what is not built yet and combinations that
    cannot work. Each error: {"loc": "video_config.max_frames", "msg": ...} (loc "" for the whole config)."""
    if not isinstance(data, dict):
        return None, [{"loc": "", "msg": f"the config must be a JSON object, got {type(data).__name__}"}]
    try:
        config = validate_schema(data)
    except ValidationError as error:
        errors = []
        for problem in error.errors():
            loc = _field_loc(tuple(problem["loc"]), data, problem["type"] == "missing")
            if problem["type"] == "missing":
                message = "this key is required"
            elif problem["type"] == "extra_forbidden":
                message = "unknown key"
            else:
                message = problem["msg"].removeprefix("Value error, ")
            errors.append({"loc": loc, "msg": message})
        return None, errors
    if config.concepts is None and config.concept_file_name is None:
        return config, [{"loc": "", "msg": "the config names no training data: set `concepts` (a list of folders) "
                                            "or `concept_file_name` (a concepts.json file)"}]
    try:
        check_config(config, Path("config"))
    except ConfigError as error:
        errors = []
        for line in str(error).splitlines()[1:]:
            match = _PROBLEM_KEY.match(line)
            loc = re.sub(r"\[(\d+)\]", r".\1", match.group(1)) if match else ""
            errors.append({"loc": loc, "msg": line.strip().removeprefix("- ")})
        return config, errors
    return config, []


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
    import torch

    from ..data.survey import survey_dataset
    from ..inspect import file_record, summary_record
    from ..models import family_for

    survey = survey_dataset(config, family_for(config, torch.device("cpu")), require_usable=False)
    files = []
    for entry in survey.entries:
        record = file_record(entry)
        record["name"] = entry.item.path.name
        try:
            record["thumbnails"] = thumbnails(entry)
        except Exception as error:  # a file that probes but will not decode: say so, keep the report
            record["thumbnails"] = []
            record["problems"].append(f"thumbnails: {type(error).__name__}: {error}")
        files.append(record)
    return {"files": files, "summary": summary_record(survey)}


# ---------------------------------------------------------------------------------------------- runs

def _is_motiontune(pid: int) -> bool:
    try:
        return b"motiontune" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class RunState:
    """The watched workspace and, when the UI started it, the training process."""

    def __init__(self, workspace: Path | None = None):
        self.lock = threading.Lock()
        self.workspace: Path | None = None
        self.output_dir: Path | None = None
        self.process: subprocess.Popen | None = None
        self.process_workspace: Path | None = None
        self._scalars: dict = {}  # workspace → (EventAccumulator, last reload time)
        if workspace is not None:
            self.watch(workspace)

    def watch(self, workspace: Path) -> None:
        workspace = Path(workspace).expanduser().resolve()
        if workspace == Path(workspace.anchor) or workspace == Path.home().resolve():
            raise HTTPException(400, f"{workspace} is too wide to serve files from; pick the run's workspace_dir")
        self.workspace = workspace
        config = _read_json(workspace / "config.json") or _read_json(workspace / UI_CONFIG) or {}
        destination = config.get("output_model_destination") if isinstance(config, dict) else None
        self.output_dir = Path(destination).expanduser().resolve().parent if destination else None
        if self.output_dir is not None and self.output_dir in (Path(self.output_dir.anchor), Path.home().resolve()):
            self.output_dir = None  # an output file straight in / or ~: its folder is not served

    def roots(self) -> list[Path]:
        return [root for root in (self.workspace, self.output_dir) if root is not None]

    def scalars(self) -> dict[str, list]:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        directory = self.workspace / "tensorboard"
        if not directory.is_dir():
            return {}
        key = str(directory)
        if key not in self._scalars:
            self._scalars = {key: EventAccumulator(key, size_guidance={"scalars": 0})}
        accumulator = self._scalars[key]
        try:
            accumulator.Reload()
        except Exception as error:  # a file mid-write: the next poll reads it
            log.debug("tensorboard reload: %s", error)
        tags = accumulator.Tags().get("scalars", [])
        return {tag: [[e.step, e.value] for e in accumulator.Scalars(tag)] for tag in tags}

    def owned_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def status(self) -> dict:
        if self.workspace is None:
            return {"workspace": None}
        workspace = self.workspace
        progress = _read_json(workspace / PROGRESS_FILE)
        owned = self.process is not None and self.process_workspace == workspace
        if owned:
            running = self.owned_running()
        else:
            running = bool(progress and progress.get("state") == "training" and process_alive(progress.get("pid")))
        samples = sorted((workspace / "samples").glob("*.mp4"), key=lambda p: p.stat().st_mtime) if (workspace / "samples").is_dir() else []
        backups = []
        if (workspace / "backup").is_dir():
            for folder in sorted((workspace / "backup").iterdir()):
                if folder.is_dir() and folder.name.startswith("step-") and (folder / "state.pt").is_file():
                    backups.append({"name": folder.name, "path": str(folder), "info": _read_json(folder / "backup.json")})
        log_tail = ""
        if (workspace / UI_LOG).is_file():
            with open(workspace / UI_LOG, "rb") as handle:
                handle.seek(max(0, handle.seek(0, 2) - 6000))
                log_tail = handle.read().decode(errors="replace").replace("\r", "\n")
                log_tail = "\n".join(line for line in log_tail.splitlines() if line.strip())[-4000:]
        return {
            "workspace": str(workspace),
            "running": running,
            "owned": owned,
            "exit_code": self.process.poll() if owned else None,
            "progress": progress,
            "scalars": self.scalars(),
            "samples": [{"name": p.name, "url": f"/files/samples/{p.name}", "modified": p.stat().st_mtime} for p in samples],
            "backups": backups,
            "result": _read_json(workspace / "result.json"),
            "log": log_tail,
        }

    def start(self, data: dict, config: TrainConfig) -> dict:
        with self.lock:
            if self.owned_running():
                raise HTTPException(409, "a run started here is still going; stop it first")
            workspace = Path(config.workspace_dir).expanduser().resolve()
            progress = _read_json(workspace / PROGRESS_FILE)
            if progress and progress.get("state") == "training" and process_alive(progress.get("pid")):
                raise HTTPException(409, f"another process (pid {progress['pid']}) is training in {workspace}")
            workspace.mkdir(parents=True, exist_ok=True)
            (workspace / PROGRESS_FILE).unlink(missing_ok=True)  # the last run's present moment, not this one's
            config_path = workspace / UI_CONFIG
            config_path.write_text(json.dumps(data, indent=2))
            with open(workspace / UI_LOG, "wb") as output:
                self.process = subprocess.Popen(
                    [sys.executable, "-m", "motiontune", "train", "--config", str(config_path)],
                    stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                    start_new_session=True,  # Ctrl-C on the UI server leaves the run going; it can be watched again
                )
            self.process_workspace = workspace
            self.watch(workspace)
            return {"pid": self.process.pid, "workspace": str(workspace), "config": str(config_path)}

    def stop(self) -> dict:
        """SIGINT, as Ctrl-C: the trainer finishes its step, writes a backup and the model, and exits."""
        with self.lock:
            if self.owned_running() and self.process_workspace == self.workspace:
                self.process.send_signal(signal.SIGINT)
                return {"signalled": self.process.pid}
            progress = _read_json(self.workspace / PROGRESS_FILE) if self.workspace else None
            pid = progress.get("pid") if progress and progress.get("state") == "training" else None
            if pid and process_alive(pid) and _is_motiontune(pid):  # a run started from the command line
                os.kill(pid, signal.SIGINT)
                return {"signalled": pid}
            raise HTTPException(409, "no run is training in the watched workspace")


# ---------------------------------------------------------------------------------------------- app

def _host_name(netloc: str) -> str:
    return (urlsplit(f"//{netloc}").hostname or "").lower()


def create_app(workspace: str | Path | None = None, allowed_hosts: set[str] | None = LOOPBACK_NAMES) -> FastAPI:
    """`allowed_hosts`: names the Host header may carry (None: any, when bound to a non-loopback address)."""
    app = FastAPI(title="motiontune ui", docs_url=None, redoc_url=None, openapi_url=None)
    state = RunState(Path(workspace) if workspace else None)
    app.state.run = state

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
        _, errors = validate(config)
        return {"ok": not errors, "errors": errors}

    @app.post("/api/config/load")
    def load_file(path: str = Body(..., embed=True)):
        file = Path(path).expanduser()
        if file.suffix.lower() != ".json":
            raise HTTPException(400, "a config is a .json file")
        if not file.is_file():
            raise HTTPException(404, f"{file}: no such file")
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
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
        if parsed is None:
            return JSONResponse({"detail": "the config is not valid", "errors": errors}, status_code=422)
        try:
            return inspect_report(parsed)
        except (ConfigError, MediaError) as error:
            raise HTTPException(400, str(error)) from None

    @app.post("/api/train/start")
    def start(config=Body(..., embed=True)):
        parsed, errors = validate(config)
        if errors:
            return JSONResponse({"detail": "the config is not valid", "errors": errors}, status_code=422)
        return state.start(config, parsed)

    @app.post("/api/train/stop")
    def stop():
        return state.stop()

    @app.post("/api/watch")
    def watch(workspace: str = Body(..., embed=True)):
        if not Path(workspace).expanduser().is_dir():
            raise HTTPException(404, f"{workspace}: no such folder")
        state.watch(Path(workspace))
        return {"workspace": str(state.workspace), "output_dir": str(state.output_dir) if state.output_dir else None}

    @app.get("/api/run")
    def run():
        return state.status()

    def serve(candidate: Path) -> FileResponse:
        try:
            resolved = candidate.resolve()
        except (OSError, RuntimeError):
            raise HTTPException(404, "not found") from None
        if not any(resolved.is_relative_to(root) for root in state.roots()):
            raise HTTPException(403, "outside the workspace and output folders")
        if not resolved.is_file():
            raise HTTPException(404, "not found")
        return FileResponse(resolved)

    @app.get("/files/{path:path}")
    def workspace_file(path: str):
        """A file of the watched workspace, by its path inside it."""
        if state.workspace is None:
            raise HTTPException(404, "no workspace is watched")
        return serve(state.workspace / path)

    @app.get("/api/file")
    def any_file(path: str):
        """A file by absolute path (or relative to the workspace), inside the workspace or output folder."""
        base = state.workspace or Path.cwd()
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


def run_server(host: str | None, port: int, workspace: str | None = None) -> None:
    """`host` None: 127.0.0.1. A non-loopback address is bound only when given explicitly, with a warning."""
    import uvicorn

    explicit = host is not None
    host = host or "127.0.0.1"
    loopback = check_bind(host, explicit)
    # loopback: only requests naming this machine (DNS rebinding); otherwise any name the machine is reached by
    allowed = LOOPBACK_NAMES | {host.strip("[]").lower()} if loopback else None
    app = create_app(workspace, allowed_hosts=allowed)
    shown = f"[{host}]" if ":" in host else host
    print(f"motiontune ui: http://{shown}:{port}/  (Ctrl-C to quit; a run started here keeps going)", file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level="warning")
