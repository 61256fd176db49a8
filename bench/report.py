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


def _grouped_bars(
    labels: list[str],
    series: dict[str, list[float]],
    reference: tuple[float, str | None],
    ylabel: str,
    meta: dict,
    path: Path,
) -> Path:
    """One bar per series per case label, a horizontal reference line; saved to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(max(8, 0.5 * len(labels) * max(len(series), 1)), 5))
    width = 0.8 / max(len(series), 1)
    for index, (name, values) in enumerate(series.items()):
        axis.bar([i + index * width for i in range(len(labels))], values, width, label=name)
    value, label = reference
    axis.axhline(value, color="black", linestyle="--" if label else "-", linewidth=0.8, label=label)
    axis.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))], labels, rotation=60, ha="right", fontsize=7)
    axis.set_ylabel(ylabel)
    axis.set_title(f"{meta['device_name']}, world size {meta['world_size']}")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot(rows: list[dict], meta: dict, out: Path) -> list[Path]:
    """bandwidth.png: actual GB/s per case and provider, with the copy bandwidth line;
    speedup.png: our speedup over each other provider per case."""
    cases = sorted({case_key(row) for row in rows}, key=lambda key: [str(part) for part in key])
    providers = [
        p for p in ("triton_syncbn", "torch_sync", "torch_bn", "apex") if any(r["provider"] == p for r in rows)
    ]
    labels = ["/".join(str(part) for part in case) for case in cases]
    lookup = {(case_key(row), row["provider"]): row for row in rows}
    bandwidth = {p: [lookup.get((case, p), {}).get("actual_gbps", 0.0) for case in cases] for p in providers}
    copy_line = (meta["copy_gbps"], f"copy {meta['copy_gbps']:.0f} GB/s")
    speedups = {
        f"vs {p}": [(lookup.get((case, "triton_syncbn"), {}).get("speedup_vs") or {}).get(p, 0.0) for case in cases]
        for p in providers
        if p != "triton_syncbn"
    }
    return [
        _grouped_bars(labels, bandwidth, copy_line, "actual GB/s (bytes moved / time)", meta, out / "bandwidth.png"),
        _grouped_bars(labels, speedups, (1.0, None), "speedup of triton_syncbn (x)", meta, out / "speedup.png"),
    ]
