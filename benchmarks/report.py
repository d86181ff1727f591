"""Markdown tables from the JSON files ``bench.py --json`` writes (for benchmarks/RESULTS.md).

    python benchmarks/report.py run1.json [run2.json ...]
"""
from __future__ import annotations

import json
import sys
from typing import List


def table(path: str) -> str:
    with open(path) as f:
        run = json.load(f)
    args = run["args"]
    lines: List[str] = [
        f"**{run['machine']}**, torch {run.get('torch', 'unrecorded')}: {', '.join(args['models'])}, "
        f"batch {args['batch']}, {args['size']}x{args['size']}, IG/Blur IG/Guided IG steps {args['steps']}, "
        f"SmoothGrad samples {args['samples']}, median of {args['repeats']}"
        + (", channels-last" if args.get("channels_last") else "") + (", bf16 autocast" if args.get("amp") else ""),
        "",
        "| model | method | rows/pass | floor s | ours s | ours / floor | peak MiB (floor) | peers: s (x ours) |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in run["rows"]:
        peers = "; ".join(f"{name} {sec:.3f} ({sec / r['ours_s']:.2f}x)" for name, sec in r["peers"].items())
        notes = "; ".join(r["notes"])
        lines.append(f"| {r['model']} | {r['method']} | {r['rows_per_pass']} | {r['floor_s']:.3f} | "
                     f"{r['ours_s']:.3f} | {r['ratio']:.2f} | {r['peak_mib']:.0f} ({r['floor_peak_mib']:.0f}) | "
                     f"{peers}{' ' + notes if notes else ''} |")
    return "\n".join(lines)


def main(paths: List[str]) -> None:
    print("\n\n".join(table(p) for p in paths))


if __name__ == "__main__":
    main(sys.argv[1:])
