"""`motiontune train | cache | inspect | presets | estimate | check | lora | make-tiny-model | demo | ui`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


class _TqdmHandler(logging.Handler):
    """Log lines printed above the progress bar instead of through it."""

    def emit(self, record):
        # a bar is on screen only if something imported tqdm: commands without one (inspect) need not import it
        tqdm = sys.modules.get("tqdm")
        if tqdm is not None:
            tqdm.tqdm.write(self.format(record), file=sys.stderr)
        else:
            print(self.format(record), file=sys.stderr)


def _setup_logging(verbose: bool, models: bool | str) -> None:
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("[motiontune] %(message)s"))
    logger = logging.getLogger("motiontune")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
    if not models:  # importing diffusers and transformers to quiet them costs seconds
        return
    if models == "when imported":  # `estimate` reads its figures from disk when it can: the libraries read these then
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        return
    # Library chatter (weight-loading bars, deprecation notes) hides what matters.
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.set_verbosity_error()
        library.disable_progress_bar()


def _report(result) -> None:
    if not result.report:
        return
    if result.nothing_to_do:
        print("\nNothing left to train: the newest backup is the end of the run, whose model is already saved.")
        return
    print("\nStopped early; continue with --resume." if result.interrupted else "\nDone.")
    for path in result.lora_paths:
        print(f"  {'LoRA:' if result.method == 'LORA' else 'model:':12} {path}")
    for path in result.sample_paths:
        print(f"  sample:      {path}")
    for error in result.sample_errors:
        print(f"  failed:      {error}")
    print(f"  TensorBoard: {result.tensorboard_dir}   (tensorboard --logdir {result.tensorboard_dir})")


def cmd_train(args) -> int:
    from .configure import load_config

    config = load_config(args.config, args.set or [])
    if args.gpu_gb or config.memory == "auto":  # memory options chosen for the card and the host (motiontune/planner.py)
        from .estimate import EstimateError
        from .planner import PlanError, card_gb, log_plan, plan

        try:
            chosen = plan(config, args.gpu_gb or card_gb(config), args.host_gb, args.allow_smaller_batch)
        except (PlanError, EstimateError) as error:
            print(f"train: {error}", file=sys.stderr)
            return 2
        log_plan(chosen)
        config = load_config(args.config, [*(args.set or []), *chosen.overrides])
    from .train.loop import train  # imported after validation: a bad config fails before the trainer loads

    _report(train(config, resume=args.resume))
    return 0


def cmd_cache(args) -> int:
    from .configure import load_config
    from .data.encoder_process import fill_cache
    from .models import family_for
    from .train.loop import pick_device

    config = load_config(args.config, args.set or [])
    encoding = fill_cache(config, family_for(config, pick_device(config.train_device)))
    cache = encoding.cache
    masks = f", {len(encoding.used['masks'])} masks ({encoding.calls['mask']} made now)" if config.masked_training else ""
    if encoding.used["conditions"]:  # control videos and the like (docs/control.md)
        masks += f", {len(encoding.used['conditions'])} conditions ({encoding.calls['condition']} encoded now)"
    print(f"cache {config.cache_dir}: {len(encoding.used['latents'])} clip latents and {len(encoding.used['text'])} "
          f"text embeddings in use ({encoding.calls['video']} and {encoding.calls['text']} encoded now){masks}")
    if args.clear:
        print(f"removed {cache.remove_unused(encoding.used)} entries no current clip or caption uses")
    return 0


def cmd_inspect(args) -> int:
    from .inspect import as_json, as_summary, as_table, inspect

    survey, _ = inspect(args.target, args.set or [])
    print(as_json(survey) if args.json else as_table(survey) if args.files else as_summary(survey))
    return 0


def cmd_presets(args) -> int:
    from .config import list_presets
    from .config.load import PRESETS_DIR

    for name in list_presets():
        print(name)
    print(f"\n(in {PRESETS_DIR}; use one with --config \"NAME\")", file=sys.stderr)
    return 0


def cmd_estimate(args) -> int:
    from .configure import load_config
    from .estimate import EstimateError, report

    config = load_config(args.config, args.set or [])
    try:
        print(report(config, args.config, gpu_gb=args.gpu_gb, seed_table=args.seed_table, processes=args.processes))
    except EstimateError as error:
        print(f"estimate: {error}", file=sys.stderr)
        return 2
    return 0


def cmd_check(args) -> int:
    from .check import check
    from .check.report import report
    from .check.runtime import DryRunError
    from .configure import load_config

    load_config(args.config, args.set or [])  # a bad config is refused here, before the dry run's process starts
    try:
        result = check(args.config, args.set or [], gpu_gb=args.gpu_gb)
    except DryRunError as error:
        print(f"check: {error}", file=sys.stderr)
        return 2
    print(report(args.config, result))
    return 1 if result["findings"] else 0


def cmd_make_tiny_model(args) -> int:
    from .testing.tiny_models import make_tiny_model

    print(make_tiny_model(args.family, args.out, seed=args.seed))
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    _report(run_demo(Path(args.out), args.set or []))
    return 0


def cmd_ui(args) -> int:
    from .ui import run_server  # FastAPI and uvicorn load only for this command

    run_server(args.host, args.port, args.workspace, args.browse)
    return 0


def _describe(error: Exception) -> str:
    if isinstance(error, OSError) and error.errno is not None:  # a full disk, a missing permission, ...
        where = f" ({error.filename})" if error.filename else ""
        return f"{error.strerror}{where}"
    return f"{type(error).__name__}: {error}"


def _newest_backup(args) -> Path | None:
    """The newest backup of the run the command was about, if any (said after a failure)."""
    if args.command != "train":
        return None
    try:
        from .configure import load_config
        from .train.backup import list_backups

        backups = list_backups(Path(load_config(args.config, args.set or []).workspace_dir) / "backup")
    except Exception:
        return None
    return backups[-1] if backups else None


def main(argv: list[str] | None = None) -> int:
    from .models.registry import tiny_models

    parser = argparse.ArgumentParser(prog="motiontune", description="Train video diffusion models (WAN 2.1/2.2, HunyuanVideo, HunyuanVideo 1.5, HiDream-I1, "
                                     "LTX-2, LTX-2.3, LTX-2.5 and MiniMax H3 with sound, Kandinsky 5): LoRA, full fine-tune or "
                                     "embedding.")
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train from a JSON config or a shipped preset")
    train.add_argument("--config", required=True, help='a config file, or a preset name such as "#wan 2.2 LoRA"')
    train.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a key (dotted: video_config.max_frames=33)")
    train.add_argument("--resume", nargs="?", const="latest", metavar="BACKUP",
                       help="continue from a backup folder (default: the newest in workspace_dir/backup)")
    train.add_argument("--gpu-gb", type=float, metavar="N",
                       help="choose the cheapest memory options with which the run fits an N GB card (and the host)")
    train.add_argument("--host-gb", type=float, metavar="M", help="with --gpu-gb: the host's RAM (default: this machine's)")
    train.add_argument("--allow-smaller-batch", action="store_true",
                       help="with --gpu-gb: the plan may halve the batch, adding gradient accumulation")
    train.set_defaults(run=cmd_train)

    cache = commands.add_parser("cache", help="encode latents and text embeddings into the cache, without training")
    cache.add_argument("--config", required=True)
    cache.add_argument("--set", action="append", metavar="KEY=VALUE")
    cache.add_argument("--clear", action="store_true", help="then remove entries no current clip or caption uses")
    cache.set_defaults(run=cmd_cache)

    inspect = commands.add_parser("inspect", help="show what a dataset (folder or config) will train on")
    inspect.add_argument("target", help="a dataset folder, a config file or a preset name")
    inspect.add_argument("--json", action="store_true", help="one machine-readable JSON document")
    inspect.add_argument("--files", action="store_true", help="a table of every file before the summary")
    inspect.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a key, e.g. video_config.target_fps=16")
    inspect.set_defaults(run=cmd_inspect)

    presets = commands.add_parser("presets", help="list the shipped presets")
    presets.set_defaults(run=cmd_presets)

    estimate = commands.add_parser("estimate", help="predict the device memory a config needs (no weights read)")
    estimate.add_argument("--config", required=True, help='a config file, or a preset name such as "#wan 2.2 LoRA"')
    estimate.add_argument("--gpu-gb", type=float, metavar="N", help="say whether it fits N GB, and what to change if not")
    estimate.add_argument("--seed-table", action="store_true",
                          help="also estimate OneTrainer's WAN 2.2 table (8/16/24/48 GB) with this model and method")
    estimate.add_argument("--processes", type=int, default=1, metavar="N",
                          help="the torchrun world size: a fine-tune is sharded over N processes (FSDP2); one process's memory")
    estimate.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a key")
    estimate.set_defaults(run=cmd_estimate)

    from .lora_tools.commands import add_lora_parser

    add_lora_parser(commands)  # lora check | convert | merge | resize
    check = commands.add_parser("check", help="dry-run a config's real code path on a fake GPU (no GPU, no weights)")
    check.add_argument("--config", required=True, help='a config file, or a preset name such as "#wan 2.2 LoRA"')
    check.add_argument("--gpu-gb", type=float, default=24.0, metavar="N",
                       help="the card's memory, as sampling asks whether a decode fits (default 24)")
    check.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a key")
    check.set_defaults(run=cmd_check)

    tiny = commands.add_parser("make-tiny-model", help="write a tiny random model of a real architecture")
    tiny.add_argument("--family", required=True, choices=tiny_models())
    tiny.add_argument("--out", required=True)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(run=cmd_make_tiny_model)

    demo = commands.add_parser("demo", help="train a tiny built-in WAN model on the bundled clips")
    demo.add_argument("--out", default="demo-output")
    demo.add_argument("--set", action="append", metavar="KEY=VALUE")
    demo.set_defaults(run=cmd_demo)

    ui = commands.add_parser("ui", help="a local web app: edit configs, inspect datasets, start, stop and watch training")
    ui.add_argument("--host", default=None, help="address to bind (default 127.0.0.1; another address is reachable "
                    "from other machines and is bound only when given here, with a warning)")
    ui.add_argument("--port", type=int, default=8765)
    ui.add_argument("--workspace", default=None, help="a run's workspace_dir to watch from the start (e.g. a CLI run)")
    ui.add_argument("--browse", action="append", metavar="DIR", help="a folder the path pickers may list (repeatable; "
                    "default: the current folder and the workspace); typed paths are not limited to these")
    ui.set_defaults(run=cmd_ui)

    args = parser.parse_args(argv)
    _setup_logging(args.verbose, models="when imported" if args.command == "estimate"
                   else args.command not in ("inspect", "presets"))
    if args.command != "train" or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return _run(args)
    code = 1
    try:
        code = _run(args)
    except BaseException:  # -v re-raises: the traceback is printed here, as the interpreter would
        import traceback

        traceback.print_exc()
    finally:
        _leave_torchrun_worker(code)


def _leave_torchrun_worker(code: int) -> None:
    """End a torchrun worker without Python's shutdown. FSDP keeps the gloo process group alive after it is
    destroyed, with its C++ threads running; tearing them down with the interpreter can abort the process
    ("terminate called without an active exception") after the run has written everything, and torchrun then
    reports a failed run. Everything the run writes is closed by now."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run(args) -> int:
    from .config import ConfigError
    from .data.video import MediaError

    try:
        return args.run(args)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    except MediaError as error:
        print(f"data error: {error}", file=sys.stderr)
        return 4
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        from .methods.base import SaveError
        from .models import ModelLoadError
        from .train.step import TrainingDiverged

        for kind, label, code in ((ModelLoadError, "model error", 3), (TrainingDiverged, "training stopped", 5), (SaveError, "save error", 6)):
            if isinstance(error, kind):
                print(f"{label}: {error}", file=sys.stderr)
                return code
        if args.verbose:
            raise
        # anything else: one message, not a traceback (-v shows it)
        print(f"error: {args.command} failed: {_describe(error)}", file=sys.stderr)
        saved = _newest_backup(args)
        if saved:
            print(f"The newest backup is {saved}: after fixing the cause, continue with `motiontune train --config "
                  f"{args.config!r} --resume`.", file=sys.stderr)
        print("Run the same command with -v to see the full traceback (and include it if you report a bug).", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
