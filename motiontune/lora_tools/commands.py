"""The `motiontune lora ...` command line: arguments, and what each command prints."""

from __future__ import annotations

import sys
from pathlib import Path

MODALITY_NAMES = {"audio": "audio", "video": "video", "text-encoder": "text encoder"}


def add_lora_parser(commands) -> None:
    lora = commands.add_parser("lora", help="check, convert, merge or resize a LoRA file")
    tools = lora.add_subparsers(dest="lora_command", required=True)

    check = tools.add_parser("check", help="which keys the stock diffusers loader and ComfyUI's LoRA loader take")
    check.add_argument("file")
    _model_arguments(check)
    check.add_argument("--drop", choices=sorted(MODALITY_NAMES), help="write a copy without what adapts this")
    check.add_argument("--out", help="where --drop writes (default: FILE-without-<what>.safetensors)")
    check.set_defaults(run=cmd_check)

    convert = tools.add_parser("convert", help="between COMFY_LORA and DIFFUSERS_LORA")
    convert.add_argument("file")
    convert.add_argument("out")
    convert.add_argument("--to", required=True, choices=("DIFFUSERS_LORA", "COMFY_LORA"))
    _model_arguments(convert)
    convert.set_defaults(run=cmd_convert)

    merge = tools.add_parser("merge", help="merge a LoRA into the base transformer")
    merge.add_argument("file")
    merge.add_argument("--base", required=True, help="the base model's diffusers folder")
    merge.add_argument("--out", required=True, help="a .safetensors name: one original-layout file (ComfyUI's "
                       "diffusion-model loader, diffusers' from_single_file); anything else: a diffusers folder")
    merge.add_argument("--model-type", required=True)
    merge.add_argument("--strength", type=float, default=1.0)
    merge.set_defaults(run=cmd_merge)

    resize = tools.add_parser("resize", help="to a lower rank, by SVD of each module's change")
    resize.add_argument("file")
    resize.add_argument("out")
    resize.add_argument("--rank", type=int, required=True)
    resize.set_defaults(run=cmd_resize)


def _model_arguments(parser) -> None:
    parser.add_argument("--model-type", help="the model type the file is for (WAN_2_1_T2V, LTX_2, ...)")
    parser.add_argument("--model", help="a model folder (or Hub id) of that type, when not the released size")
    parser.add_argument("--config", help="instead: the config of the run that made the file")


def _target(args):
    from .target import part_for, target_for

    return target_for(args.model_type, args.config, args.model, part_for(Path(args.file)))


def _refused(error: Exception) -> int:
    print(f"lora error: {error}", file=sys.stderr)
    return 2


# --- check ----------------------------------------------------------------------------------------------------------
def cmd_check(args) -> int:
    from .check import check, without
    from .lora_file import LoraFile, LoraFileError, save_lora

    try:
        lora = LoraFile.read(args.file)
        if args.drop:
            dropped = MODALITY_NAMES[args.drop]
            kept = without(lora, dropped)
            out = Path(args.out or Path(args.file).with_name(f"{Path(args.file).stem}-without-{args.drop}.safetensors"))
            save_lora(kept, out, lora.metadata)
            print(f"wrote {out}: {len(kept)} tensors, {len(lora.tensors) - len(kept)} that adapt the {dropped} left out")
            lora = LoraFile.read(out)
        report = check(lora, _target(args))
    except (LoraFileError, ValueError) as error:
        return _refused(error)
    print_check(report, args.verbose)
    return 0 if report.ok else 1


def print_check(report, verbose: bool = False) -> None:
    from .check import dtype_name

    lora, target = report.lora, report.target
    entries = lora.entries()
    print(f"{lora.path}: {lora.layout}, for {target.model_type} ({target.part}: {target.source})")
    rows = [("key", "adapts", "kind", "rank", "alpha", "dtype", *(loader.name for loader in report.loaders))]
    for module, entry in entries.items():
        for suffix, tensor in entry.tensors.items():
            key = f"{module}.{suffix}" if suffix else module
            cells = [_loader_cell(loader, key) for loader in report.loaders]
            rows.append((key, entry.modality, entry.kind, str(entry.rank or "-"), _alpha(entry, lora),
                         dtype_name(tensor), *cells))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    for loader in report.loaders:
        for key, reason in loader.skipped.items():
            print(f"{loader.name} skips {key}: {reason}")
    counts = {}
    for entry in entries.values():
        counts[entry.modality] = counts.get(entry.modality, 0) + 1
    kinds = "/".join(sorted({e.kind for e in entries.values()}))
    ranks = sorted({e.rank for e in entries.values() if e.rank})
    dtypes = sorted({dtype_name(t) for t in lora.tensors.values()})
    adapts = ", ".join(f"{what} {n}" for what, n in counts.items())
    loaders = "; ".join(loader.summary(len(lora.tensors)) for loader in report.loaders)
    print(f"summary: {len(lora.tensors)} tensors in {len(entries)} modules ({adapts}), {kinds} rank "
          f"{'/'.join(map(str, ranks)) or '-'}, {'/'.join(dtypes)}; {loaders}")


def _loader_cell(loader, key: str) -> str:
    if not loader.applies:
        return "-"
    if key in loader.not_checked:
        return "?"
    return "SKIPPED" if key in loader.skipped else "loads"


def _alpha(entry, lora) -> str:
    if entry.alpha is not None:
        return f"{entry.alpha:g}"
    config = lora.adapter_metadata
    if config:
        name = entry.module.removeprefix("transformer.")
        alpha = config.get("alpha_pattern", {}).get(name, config.get("lora_alpha", config.get("alpha")))
        return f"{alpha:g}" if isinstance(alpha, (int, float)) else "-"
    return "folded" if entry.rank else "-"


# --- convert, merge, resize -----------------------------------------------------------------------------------------
def cmd_convert(args) -> int:
    from .convert import convert
    from .lora_file import LoraFile, LoraFileError

    try:
        lora = LoraFile.read(args.file)
        count = convert(lora, _target(args), args.to, Path(args.out))
    except (LoraFileError, ValueError) as error:
        return _refused(error)
    print(f"wrote {args.out}: {args.to}, {count} tensors (from {lora.layout}, {len(lora.tensors)} tensors)")
    return 0


def cmd_merge(args) -> int:
    from .lora_file import LoraFile, LoraFileError
    from .merge import merge
    from .target import part_for, target_for

    try:
        lora = LoraFile.read(args.file)
        target = target_for(args.model_type, None, args.base, part_for(Path(args.file)))
        what = merge(lora, target, Path(args.out), args.strength)
    except (LoraFileError, ValueError, FileNotFoundError) as error:
        return _refused(error)
    print(f"wrote {args.out}: {what}, {target.part} of {args.base} with {args.file} merged at strength {args.strength:g}")
    return 0


def cmd_resize(args) -> int:
    from .lora_file import LoraFile, LoraFileError, save_lora
    from .resize import resize

    try:
        lora = LoraFile.read(args.file)
        resized = resize(lora, args.rank)
    except (LoraFileError, ValueError) as error:
        return _refused(error)
    save_lora(resized.tensors, args.out, resized.metadata)
    if args.verbose:
        for module, (error, norm) in resized.errors.items():
            print(f"  {module}: relative error {error / norm if norm else 0.0:.4e}")
    print(f"wrote {args.out}: rank {args.rank}, relative error of the weight change {resized.relative_error:.4e} "
          f"(over {len(resized.errors)} modules; -v: per module)")
    return 0
