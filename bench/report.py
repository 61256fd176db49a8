"""Benchmark output: the stdout table, CSV/JSON files and matplotlib plots."""

from __future__ import annotations

import csv
import json
from pathlib import Path

COLUMNS = [
    "shape", "dims", "dtype", "layout", "mode", "provider", "median_us", "p20_us", "p80_us",
    "algorithmic_gbps", "actual_gbps", "algorithmic_fraction", "actual_fraction", "speedup_vs",
    "kernels", "collectives",
]  # fmt: skip


def case_key(row: dict) -> tuple:
    return (row["shape"], row["dtype"], row["layout"], row["mode"])


def add_speedups(rows: list[dict], ours: str = "triton_syncbn") -> None:
    """``speedup_vs``: for our rows, their time / ours per other provider, same case."""
    by_case: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        by_case.setdefault(case_key(row), {})[row["provider"]] = row
    for providers in by_case.values():
        if ours not in providers:
            continue
        mine = providers[ours]["median_us"]
        providers[ours]["speedup_vs"] = {
            name: round(row["median_us"] / mine, 3) for name, row in providers.items() if name != ours
        }


def format_table(rows: list[dict]) -> str:
    header = f"{'shape':5} {'dtype':9} {'layout':7} {'mode':16} {'provider':14} {'median us':>10} {'p20-p80 us':>17} "
    header += f"{'alg GB/s':>9} {'act GB/s':>9} {'act/copy':>8} {'kern':>4} {'coll':>4}  speedup"
    lines = [header, "-" * len(header)]
    for row in rows:
        speedups = ", ".join(f"{k} {v:.2f}x" for k, v in (row.get("speedup_vs") or {}).items())
        kernels = "-" if row["kernels"] is None else str(row["kernels"])
        spread = f"{row['p20_us']:.1f}-{row['p80_us']:.1f}"
        lines.append(
            f"{row['shape']:5} {row['dtype']:9} {row['layout']:7} {row['mode']:16} {row['provider']:14} "
            f"{row['median_us']:10.1f} {spread:>17} {row['algorithmic_gbps']:9.1f} {row['actual_gbps']:9.1f} "
            f"{row['actual_fraction']:8.2f} {kernels:>4} {row['collectives']:4d}  {speedups}"
        )
    return "\n".join(lines)


def write_files(rows: list[dict], meta: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out / "benchmark.csv", out / "benchmark.json"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "speedup_vs": json.dumps(row.get("speedup_vs") or {})})
    json_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    return [csv_path, json_path]


def plot(rows: list[dict], meta: dict, out: Path) -> list[Path]:
    """bandwidth.png: actual GB/s per case and provider, with the copy bandwidth line;
    speedup.png: our speedup over each other provider per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = sorted({case_key(row) for row in rows}, key=lambda key: [str(part) for part in key])
    providers = [
        p for p in ("triton_syncbn", "torch_sync", "torch_bn", "apex") if any(r["provider"] == p for r in rows)
    ]
    labels = ["/".join(str(part) for part in case) for case in cases]
    lookup = {(case_key(row), row["provider"]): row for row in rows}
    paths = []

    figure, axis = plt.subplots(figsize=(max(8, 0.5 * len(cases) * len(providers)), 5))
    width = 0.8 / max(len(providers), 1)
    for index, provider in enumerate(providers):
        values = [lookup.get((case, provider), {}).get("actual_gbps", 0.0) for case in cases]
        axis.bar([i + index * width for i in range(len(cases))], values, width, label=provider)
    axis.axhline(meta["copy_gbps"], color="black", linestyle="--", label=f"copy {meta['copy_gbps']:.0f} GB/s")
    axis.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))], labels, rotation=60, ha="right", fontsize=7)
    axis.set_ylabel("actual GB/s (bytes moved / time)")
    axis.set_title(f"{meta['device_name']}, world size {meta['world_size']}")
    axis.legend(fontsize=8)
    figure.tight_layout()
    paths.append(out / "bandwidth.png")
    figure.savefig(paths[-1], dpi=120)
    plt.close(figure)

    others = [p for p in providers if p != "triton_syncbn"]
    figure, axis = plt.subplots(figsize=(max(8, 0.5 * len(cases) * max(len(others), 1)), 5))
    width = 0.8 / max(len(others), 1)
    for index, provider in enumerate(others):
        values = [
            (lookup.get((case, "triton_syncbn"), {}).get("speedup_vs") or {}).get(provider, 0.0) for case in cases
        ]
        axis.bar([i + index * width for i in range(len(cases))], values, width, label=f"vs {provider}")
    axis.axhline(1.0, color="black", linewidth=0.8)
    axis.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))], labels, rotation=60, ha="right", fontsize=7)
    axis.set_ylabel("speedup of triton_syncbn (x)")
    axis.set_title(f"{meta['device_name']}, world size {meta['world_size']}")
    axis.legend(fontsize=8)
    figure.tight_layout()
    paths.append(out / "speedup.png")
    figure.savefig(paths[-1], dpi=120)
    plt.close(figure)
    return paths
