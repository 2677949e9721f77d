"""The dry run's result as text."""

from __future__ import annotations

KINDS = {
    "mismatch": "a host tensor meets a GPU tensor",
    "generator": "a CPU generator draws GPU noise",
    "saved": "a saved tensor is on the GPU",
    "error": "the stage stopped",
}


def report(name: str, result: dict) -> str:
    lines = [f"{name}: a dry run of the real code path on a fake CUDA device (the released model's sizes, no weights, "
             f"{result['gpu_gb']:g} GB free as sampling asks), {result['seconds']:.0f} s", ""]
    width = max(len(stage["name"]) for stage in result["stages"])
    for stage in result["stages"]:
        lines.append(f"  {stage['name']:<{width}}  {stage['status']:<7}  {stage['seconds']:6.1f} s  {stage['note']}")
    findings = result["findings"]
    lines += ["", "Device placement: no problem found." if not findings else f"Device placement: {len(findings)} problem(s)."]
    for number, finding in enumerate(findings, 1):
        lines.append(f"  {number}. [{finding['stage']}] {KINDS[finding['kind']]}: {finding['message']}")
        if finding["module"]:
            lines.append(f"     module: {finding['module']}")
        if finding["where"]:
            lines.append(f"     at: {' < '.join(finding['where'])}")
        for origin in finding["origins"]:
            lines.append(f"     tensor: {origin}")
    if result["assumed"]:
        lines += ["", "Values a dry run does not compute, taken as finite (a loss, a gradient norm):"]
        lines += [f"  {where} ({count}×)" for where, count in result["assumed"].items()]
    lines += ["", "Not checked on a CPU (a real GPU run is the test of these):"]
    lines += [f"  - {item}" for item in result["not_covered"]]
    return "\n".join(lines)
