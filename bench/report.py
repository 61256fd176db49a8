"""Benchmark output: the stdout table, CSV/JSON files and matplotlib plots."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

COLUMNS = [
    "world_size", "shape", "dims", "dtype", "layout", "mode", "provider", "median_us", "p20_us", "p80_us",
    "algorithmic_gbps", "actual_gbps", "algorithmic_fraction", "actual_fraction", "speedup_vs",
    "kernels", "collectives",
]  # fmt: skip


def case_key(row: dict) -> tuple:
    return (row.get("world_size", 1), row["shape"], row["dtype"], row["layout"], row["mode"])


def add_speedups(rows: list[dict], ours: str = "triton_syncbn") -> None:
    """``speedup_vs``: for our rows, their time / ours per other provider, same case and world size."""
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


def geometric_mean(values: list[float]) -> float:
    return math.exp(sum(math.log(value) for value in values) / len(values)) if values else float("nan")


def headline(rows: list[dict], ours: str = "triton_syncbn") -> list[str]:
    """The summary's first lines, in words: per world size, mode and other provider, the
    geometric mean (and range) of our time over theirs; below 1 we are faster."""
    lines = []
    worlds = sorted({row.get("world_size", 1) for row in rows})
    for world in worlds:
        where = "world size 1 (no process group)" if world == 1 else f"{world} ranks, synchronized"
        mine = [row for row in rows if row["provider"] == ours and row.get("world_size", 1) == world]
        modes = list(dict.fromkeys(row["mode"] for row in mine))
        others = list(dict.fromkeys(name for row in mine for name in (row.get("speedup_vs") or {})))
        for other in others:
            parts = []
            for mode in modes:
                ratios = [
                    (1.0 / row["speedup_vs"][other], row)
                    for row in mine
                    if row["mode"] == mode and other in (row.get("speedup_vs") or {})
                ]
                if not ratios:
                    continue
                by_dtype = {}
                for ratio, row in ratios:
                    by_dtype.setdefault(row["dtype"], []).append(ratio)
                worst, worst_row = max(ratios, key=lambda item: item[0])
                dtypes = ", ".join(f"{dtype} {geometric_mean(values):.2f}x" for dtype, values in by_dtype.items())
                parts.append(
                    f"{mode} {geometric_mean([ratio for ratio, _ in ratios]):.2f}x ({dtypes}; "
                    f"range {min(r for r, _ in ratios):.2f}-{worst:.2f}x, slowest {worst_row['shape']}/"
                    f"{worst_row['dtype']}/{worst_row['layout']}, {len(ratios)} cases)"
                )
            if parts:
                lines.append(f"- {where}: our time / {other}'s time, geometric mean: " + "; ".join(parts) + ".")
    return lines


def format_table(rows: list[dict]) -> str:
    header = f"{'ws':2} {'shape':5} {'dtype':5} {'layout':13} {'mode':15} {'provider':13} {'median us':>10} "
    header += f"{'p20-p80 us':>17} {'act GB/s':>9} {'act/copy':>8} {'kern':>4} {'coll':>4}  speedup"
    lines = [header, "-" * len(header)]
    for row in rows:
        speedups = ", ".join(f"{k} {v:.2f}x" for k, v in (row.get("speedup_vs") or {}).items())
        kernels = "-" if row["kernels"] is None else str(row["kernels"])
        spread = f"{row['p20_us']:.1f}-{row['p80_us']:.1f}"
        lines.append(
            f"{row.get('world_size', 1):2d} {row['shape']:5} {row['dtype']:5} {row['layout']:13} {row['mode']:15} "
            f"{row['provider']:13} {row['median_us']:10.1f} {spread:>17} {row['actual_gbps']:9.1f} "
            f"{row['actual_fraction']:8.3f} {kernels:>4} {row['collectives']:4d}  {speedups}"
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


PROVIDER_ORDER = ("triton_syncbn", "torch_bn", "floor", "fairscale", "torch_sync", "apex")
MAX_WIDTH_PX = 2000
DPI = 100


def _shape_label(row: dict) -> str:
    return f"{row['shape']}\n" + "x".join(str(size) for size in row["dims"])


def _world_title(world: int) -> str:
    return "world size 1 (no group)" if world == 1 else f"{world} ranks (synchronized)"


def _plain_log_ticks(axis: object, suffix: str) -> None:
    """Log-axis tick labels as plain numbers (0.3, 1, 2x) instead of 3x10^-1."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    formatter = FuncFormatter(lambda value, _: f"{value:.3g}{suffix}")
    axis.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=30))
    axis.yaxis.set_major_formatter(formatter)
    axis.yaxis.set_minor_formatter(FuncFormatter(lambda value, _: ""))


def build_figures(rows: list[dict], meta: dict) -> dict[str, object]:
    """The plots as matplotlib figures, by file name (``plot`` saves them).

    - ``bandwidth.png``: small multiples, one row per world size and one column per layout, for
      the main mode (forward+backward when measured): shapes on the x axis, one line per
      provider (solid fp32, dashed bf16, dotted others), actual traffic as a fraction of the copy
      bandwidth measured in the same run on a log axis, the copy bandwidth as a line at 1.
    - ``speedup.png``: one panel per (world size, mode): per shape, our speedup over each other
      provider as dots (one marker per dtype and layout), log axis, a line at 1x.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures: dict[str, object] = {}
    worlds = sorted({row.get("world_size", 1) for row in rows})
    modes = list(dict.fromkeys(row["mode"] for row in rows))
    main_mode = "forward+backward" if "forward+backward" in modes else modes[0]
    layouts = list(dict.fromkeys(row["layout"] for row in rows))
    dtypes = list(dict.fromkeys(row["dtype"] for row in rows))
    styles = {dtype: ("-", "--", ":", "-.")[index % 4] for index, dtype in enumerate(dtypes)}
    colors = {name: f"C{index}" for index, name in enumerate(PROVIDER_ORDER)}
    shape_order = list(dict.fromkeys(row["shape"] for row in rows))
    labels = {row["shape"]: _shape_label(row) for row in rows}

    width = min(16.0, 8.0 * len(layouts))
    figure, axes = plt.subplots(
        len(worlds), len(layouts), figsize=(width, 3.6 * len(worlds) + 0.6), squeeze=False, sharey=True
    )
    for i, world in enumerate(worlds):
        for j, layout in enumerate(layouts):
            axis = axes[i][j]
            panel = [
                r for r in rows if r.get("world_size", 1) == world and r["layout"] == layout and r["mode"] == main_mode
            ]
            shapes = [shape for shape in shape_order if any(r["shape"] == shape for r in panel)]
            for provider in [p for p in PROVIDER_ORDER if any(r["provider"] == p for r in panel)]:
                for dtype in dtypes:
                    series = {r["shape"]: r for r in panel if r["provider"] == provider and r["dtype"] == dtype}
                    xs = [k for k, shape in enumerate(shapes) if shape in series]
                    if not xs:
                        continue
                    ys = [max(series[shapes[k]]["actual_fraction"], 1e-4) for k in xs]
                    axis.plot(xs, ys, styles[dtype], marker="o", markersize=4, color=colors[provider],
                              label=f"{provider} {dtype}")  # fmt: skip
            axis.axhline(1.0, color="black", linewidth=1.0, label=f"copy bandwidth ({meta['copy_gbps']:.0f} GB/s)")
            axis.set_yscale("log")
            _plain_log_ticks(axis, "")
            axis.set_xticks(range(len(shapes)), [labels[shape] for shape in shapes], fontsize=7)
            axis.set_xlabel("shape (N x C x spatial)")
            axis.set_ylabel("actual traffic / copy bandwidth")
            axis.set_title(f"{_world_title(world)}, {layout}, {main_mode}", fontsize=10)
            axis.grid(True, which="both", axis="y", alpha=0.3)
            axis.legend(fontsize=7, ncol=2, loc="lower left")
    figure.suptitle(f"{meta['device_name']}: bytes moved per second (higher is better)", fontsize=11)
    figure.tight_layout()
    figures["bandwidth.png"] = figure

    measured = {(r.get("world_size", 1), r["mode"]) for r in rows if r.get("speedup_vs")}
    panels = [(world, mode) for world in worlds for mode in modes if (world, mode) in measured]
    if panels:
        columns = 2 if len(panels) > 1 else 1
        grid_rows = (len(panels) + columns - 1) // columns
        figure, axes = plt.subplots(grid_rows, columns, figsize=(8.0 * columns, 3.4 * grid_rows + 0.6), squeeze=False)
        markers = {}
        for dtype in dtypes:
            for layout in layouts:
                markers[(dtype, layout)] = "osD^v<>ph"[len(markers) % 9]
        for index, (world, mode) in enumerate(panels):
            axis = axes[index // columns][index % columns]
            mine = [r for r in rows if r.get("world_size", 1) == world and r["mode"] == mode and r.get("speedup_vs")]
            shapes = [shape for shape in shape_order if any(r["shape"] == shape for r in mine)]
            others = [p for p in PROVIDER_ORDER if any(p in r["speedup_vs"] for r in mine)]
            series = [(other, key) for other in others for key in markers]
            for number, (other, (dtype, layout)) in enumerate(series):
                points = [(shapes.index(r["shape"]), r["speedup_vs"][other]) for r in mine
                          if r["dtype"] == dtype and r["layout"] == layout and other in r["speedup_vs"]]  # fmt: skip
                if not points:
                    continue
                offset = (number - (len(series) - 1) / 2) * 0.5 / max(len(series), 1)
                axis.scatter([x + offset for x, _ in points], [y for _, y in points], s=22, color=colors[other],
                             marker=markers[(dtype, layout)], label=f"vs {other}, {dtype}, {layout}")  # fmt: skip
            axis.axhline(1.0, color="black", linewidth=1.0, label="1x (same time)")
            axis.set_yscale("log")
            low, high = axis.get_ylim()
            axis.set_ylim(low, high * 4)  # headroom on the log axis for the legend above the dots
            _plain_log_ticks(axis, "x")
            axis.set_xticks(range(len(shapes)), [labels[shape] for shape in shapes], fontsize=7)
            axis.set_xlabel("shape (N x C x spatial)")
            axis.set_ylabel("speedup of triton_syncbn (x)")
            axis.set_title(f"{_world_title(world)}, {mode}", fontsize=10)
            axis.grid(True, which="both", axis="y", alpha=0.3)
            axis.legend(fontsize=6, ncol=3, loc="upper center")
        for index in range(len(panels), grid_rows * columns):
            axes[index // columns][index % columns].set_visible(False)
        figure.suptitle(f"{meta['device_name']}: their time / our time (above 1: we are faster)", fontsize=11)
        figure.tight_layout()
        figures["speedup.png"] = figure
    return figures


def plot(rows: list[dict], meta: dict, out: Path) -> list[Path]:
    """Save ``build_figures``' plots under ``out`` (at most ``MAX_WIDTH_PX`` wide)."""
    import matplotlib.pyplot as plt

    paths = []
    for name, figure in build_figures(rows, meta).items():
        path = out / name
        figure.savefig(path, dpi=DPI)
        plt.close(figure)
        paths.append(path)
    return paths
