"""Benchmark triton_syncbn against torch's BatchNorm and the other SyncBNs: the project's main command.

    python bench/benchmark.py                      # CPU: world size 1, then 2 gloo ranks, a few minutes
    python bench/benchmark.py --shapes S4 S6 --dtype bf16 --world-size 1    # on a GPU machine
    torchrun --nproc-per-node 8 bench/benchmark.py --shapes S1              # ranks from torchrun

On CPU (our plain-torch path) the default run makes two comparisons a reader can act on: at
world size 1 ours against torch.nn.BatchNorm on the same input (our overhead), and on 2 gloo
ranks ours against fairscale's SyncBatchNorm (when installed) and against the floor, torch's
BatchNorm on the local batch plus one all-reduce of our payload per direction. --interpret times
our Triton kernels in Triton's interpreter instead. On a GPU: ours against torch's synchronized
path, torch's BatchNorm and apex.

Times every (world size, shape, dtype, layout, mode, provider) case (on CPU the providers of a
case interleaved, call by call), reports median and p20/p80 time, algorithmic and actual
bandwidth (and their fraction of the copy bandwidth measured in the same run), our speedup over
each other provider, and the GPU kernels and collectives per step. Writes a table to stdout,
benchmark.csv/.json, summary.md (headline ratios in words first) and PNG plots (bandwidth and
speedup small multiples, the communication model vs world size) under --out. See
../shared/PERF.md for method and targets.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import TextIO

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = Path(__file__).resolve().parent
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--shapes", nargs="+", help="shape ids (PERF.md S1-S12; default: all for the device)")
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--layouts", nargs="+", choices=["contiguous", "channels_last"], default=None)
    parser.add_argument(
        "--modes", nargs="+", default=None,
        help="forward, backward, forward+backward, fused-relu, fused-add-relu (default: all but fused-relu on CPU, "
        "all but fused-add-relu on GPU)",
    )  # fmt: skip
    parser.add_argument(
        "--providers", nargs="+", default=None,
        help="triton_syncbn, torch_sync, torch_bn, floor, fairscale, apex (default: by device and world size, see "
        "above)",
    )  # fmt: skip
    parser.add_argument(
        "--world-size", type=int, default=None,
        help="ranks to launch (default: 1 on GPU and with --interpret; on CPU both 1 and 2, one after the other)",
    )  # fmt: skip
    parser.add_argument(
        "--interpret", action="store_true", help="run our kernels in Triton's interpreter (tiny shapes)"
    )
    parser.add_argument("--budget-ms", type=float, default=200.0, help="timing budget per case (one rank)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=40,
        help="timed repetitions per case with several ranks (collectives jitter: on 2 shared CPU cores, 20 "
        "repetitions left single ratios +-15-30%% apart between runs)",
    )
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: bench/results/<cpu|gpu>)")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument(
        "--from-rows", type=Path, default=None, metavar="ROWS_JSONL",
        help="time nothing: rebuild the table, files and plots from the rows.jsonl a run (or a killed run) left",
    )  # fmt: skip
    args = parser.parse_args(argv)
    from providers import MODES, PROVIDERS

    for name, values, known in (("--modes", args.modes, MODES), ("--providers", args.providers, PROVIDERS)):
        unknown = sorted(set(values or []) - set(known))
        if unknown:
            parser.error(f"{name}: unknown {unknown}; choose from {list(known)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_rows:
        rows, meta = read_rows(args.from_rows)
        return finish(rows, meta, args)
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton, here and in spawned ranks
    from triton_syncbn.distributed import free_local_port  # (imports triton: after the line above)

    cuda = torch.cuda.is_available() and not args.interpret
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun
        result = run_rank(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), None, args)
        return 0 if result is None else finish(*result, args)
    if args.world_size:
        worlds = [args.world_size]
    else:
        worlds = [1] if cuda or args.interpret else [1, 2]
    rows: list[dict] = []
    metas: list[dict] = []
    for world in worlds:
        if world == 1:
            result = run_rank(0, 1, free_local_port(), args)
        else:
            print(f"launching {world} ranks ({'nccl' if cuda else 'gloo'})...", flush=True)
            with tempfile.TemporaryDirectory() as folder:
                rows_file = Path(folder) / "rows.json"
                context = mp.start_processes(
                    _spawned_rank, args=(world, free_local_port(), args, str(rows_file)), nprocs=world,
                    start_method="spawn", join=False,
                )  # fmt: skip
                context.join()
                data = json.loads(rows_file.read_text())
                result = (data["rows"], data["meta"])
        rows += result[0]
        metas.append(result[1])
    meta = {**metas[0], "world_size": " and ".join(str(m["world_size"]) for m in metas)}
    return finish(rows, meta, args)


def _spawned_rank(rank: int, world: int, port: int, args: argparse.Namespace, rows_file: str) -> None:
    result = run_rank(rank, world, port, args)
    if result is not None:  # the lead rank hands its rows to the launching process
        rows, meta = result
        Path(rows_file).write_text(json.dumps({"rows": rows, "meta": meta}))


def default_providers(device: torch.device, world: int) -> list[str]:
    """The comparisons of each run (see the module docstring)."""
    if device.type == "cuda":
        return ["triton_syncbn", "torch_sync", "torch_bn", "apex"] + (["floor", "fairscale"] if world > 1 else [])
    if world == 1:
        return ["triton_syncbn", "torch_bn"]
    return ["triton_syncbn", "fairscale", "floor"]


def default_modes(device: torch.device) -> list[str]:
    if device.type == "cuda":
        return ["forward", "backward", "forward+backward", "fused-relu"]
    return ["forward", "backward", "forward+backward", "fused-add-relu"]


def run_rank(rank: int, world: int, port: int | None, args: argparse.Namespace) -> tuple[list[dict], dict] | None:
    """Time every case on this rank; the lead rank returns ``(rows, meta)``, the others None."""
    from providers import TRAFFIC, Case, build, count_events, unavailable_reason
    from shapes import CPU_SHAPES, GPU_SHAPES, INTERPRETER_SHAPES, select
    from timing import copy_bandwidth_gbps, time_interleaved

    import triton_syncbn.backend

    cuda = torch.cuda.is_available() and not args.interpret
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        # One thread per rank, at every world size: the comparisons stay like for like, and a
        # shared machine's load does not stall OpenMP barriers (2 threads on 2 busy cores did).
        torch.set_num_threads(1)
    # A group even for one GPU: torch's synchronized path needs one (PERF.md, Baselines).
    if world > 1 or cuda:
        init = None if port is None else f"tcp://127.0.0.1:{port}"
        dist.init_process_group("nccl" if cuda else "gloo", init_method=init, rank=rank, world_size=world)
    group = dist.group.WORLD if dist.is_initialized() else None
    lead = rank == 0

    shapes = select(INTERPRETER_SHAPES if args.interpret else (GPU_SHAPES if cuda else CPU_SHAPES), args.shapes)
    layouts = args.layouts or ["contiguous", "channels_last"]
    modes = args.modes or default_modes(device)
    providers = args.providers or default_providers(device, world)
    backend = triton_syncbn.backend.backend_name(torch.empty(0, device=device))
    copy_gbps = copy_bandwidth_gbps(device)
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.processor() or 'x86'})",
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "our_backend": backend,
        "world_size": world,
        "copy_gbps": round(copy_gbps, 1),
        "note": "" if cuda else f"CPU run ({backend}), one thread per rank; GPU numbers need a GPU.",
    }
    if lead:
        print(f"{meta['device_name']}, {world} rank(s), our backend: {backend}, copy {copy_gbps:.1f} GB/s, "
              f"providers: {', '.join(providers)}", flush=True)  # fmt: skip
        if meta["note"]:
            print(meta["note"], flush=True)

    cases = [
        (shape, dtype_name, layout, mode)
        for shape in shapes
        for dtype_name in args.dtype
        for layout in layouts
        if layout == "contiguous" or shape.has_channels_last
        for mode in modes
    ]
    rows: list[dict] = []
    skipped: dict[str, str] = {}
    progress = open_rows_file(args, meta, cuda) if lead else None
    for index, (shape, dtype_name, layout, mode) in enumerate(cases, 1):
        case = Case(shape.dims, DTYPES[dtype_name], layout == "channels_last", mode, device, group)
        functions = {}
        for provider in providers:
            reason = unavailable_reason(provider, case)
            if reason:
                skipped[provider] = reason
                continue
            functions[provider] = build(provider, case)
        timings = time_interleaved(functions, device, args.budget_ms, repeats=args.repeats if world > 1 else None)
        size = shape.numel * torch.empty(0, dtype=case.dtype).element_size()
        for provider, function in functions.items():
            timing = timings[provider]
            kernels, collectives = count_events(function, device)
            algorithmic, actual = (factor * size / (timing.median_us * 1e-6) / 1e9 for factor in TRAFFIC[mode])
            rows.append({
                "world_size": world, "shape": shape.id, "dims": list(shape.dims), "dtype": dtype_name,
                "layout": layout, "mode": mode, "provider": provider, "median_us": round(timing.median_us, 2),
                "p20_us": round(timing.p20_us, 2), "p80_us": round(timing.p80_us, 2),
                "algorithmic_gbps": round(algorithmic, 2), "actual_gbps": round(actual, 2),
                "algorithmic_fraction": round(algorithmic / copy_gbps, 4),
                "actual_fraction": round(actual / copy_gbps, 4), "kernels": kernels, "collectives": collectives,
            })  # fmt: skip
        del functions
        if progress is not None:
            for row in rows[len(rows) - len(timings) :]:
                progress.write(json.dumps({"row": row}) + "\n")
            progress.flush()
        if lead:
            times = ", ".join(f"{name} {timing.median_us:.1f} us" for name, timing in timings.items())
            print(f"[{index}/{len(cases)}] world {world} {shape.id} {dtype_name} {layout} {mode}: {times}", flush=True)
    if progress is not None:
        progress.close()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    if not lead:
        return None
    for provider, reason in skipped.items():
        print(f"skipped {provider}: {reason}")
    return rows, meta


def output_folder(args: argparse.Namespace, cuda: bool) -> Path:
    return args.out or HERE / "results" / ("gpu" if cuda else "cpu")


def open_rows_file(args: argparse.Namespace, meta: dict, cuda: bool) -> TextIO:
    """``rows.jsonl`` in the output folder, written case by case, so that a run stopped part way
    (a GPU lease running out) still leaves its measurements: ``--from-rows`` reports them.
    One file per world size (``rows.jsonl``, ``rows-ws2.jsonl``); the meta data comes first."""
    out = output_folder(args, cuda)
    out.mkdir(parents=True, exist_ok=True)
    world = meta["world_size"]
    file = (out / ("rows.jsonl" if world == 1 else f"rows-ws{world}.jsonl")).open("w")
    file.write(json.dumps({"meta": meta}) + "\n")
    file.flush()
    return file


def read_rows(path: Path) -> tuple[list[dict], dict]:
    """(rows, meta) from one or more ``rows*.jsonl`` files (a folder: all of them in it)."""
    files = sorted(path.glob("rows*.jsonl")) if path.is_dir() else [path]
    if not files:
        raise SystemExit(f"--from-rows: no rows*.jsonl in {path}")
    rows: list[dict] = []
    metas: list[dict] = []
    for file in files:
        for line in file.read_text().splitlines():
            record = json.loads(line)
            if "meta" in record:
                metas.append(record["meta"])
            else:
                rows.append(record["row"])
    meta = {**metas[0], "world_size": " and ".join(str(m["world_size"]) for m in metas)}
    print(f"read {len(rows)} rows from {', '.join(str(file) for file in files)}", flush=True)
    return rows, meta


def finish(rows: list[dict], meta: dict, args: argparse.Namespace) -> int:
    """Speedups, the stdout table, files and plots, from the lead rank's rows of every run."""
    from report import add_speedups, format_table, headline, plot, write_files

    cuda = meta["device"] == "cuda"
    add_speedups(rows)
    print(format_table(rows))
    out = output_folder(args, cuda)
    out.mkdir(parents=True, exist_ok=True)
    paths = write_files(rows, meta, out)
    lines = headline(rows)
    paths.append(write_summary(rows, meta, out, lines))
    if not args.no_plots and rows:
        paths += plot(rows, meta, out)
        paths.append(plot_comm_model(rows, meta, out))
    print("\n".join(["", "Summary:", *lines]))
    print("wrote " + ", ".join(str(path) for path in paths))
    return 0


def write_summary(rows: list[dict], meta: dict, out: Path, headline: list[str]) -> Path:
    """summary.md: what was measured and the headline ratios in words, then the meta data and a
    markdown table (small enough to commit)."""
    device = meta["device_name"]
    measured = (
        f"Measured on {device} ({meta['date']}, torch {meta['torch']}, our backend {meta['our_backend']}): "
        f"median time of each case (forward, backward or both, fp32/bf16, contiguous and channels_last), "
        f"world size {meta['world_size']}, providers of a case timed in the same run. A ratio below 1 means "
        "triton_syncbn takes less time."
    )
    lines = [f"# Benchmark summary ({meta['date']})", "", measured, "", *headline, ""]
    lines += [f"- {key}: {value}" for key, value in meta.items() if value != ""]
    lines += [
        "",
        "| ws | shape | dtype | layout | mode | provider | median us | actual/copy | speedup | kernels | coll |",
    ]
    lines += ["|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        speedup = ", ".join(f"{k} {v:.2f}x" for k, v in (row.get("speedup_vs") or {}).items())
        kernels = "-" if row["kernels"] is None else row["kernels"]
        lines.append(
            f"| {row.get('world_size', 1)} | {row['shape']} | {row['dtype']} | {row['layout']} | {row['mode']} | "
            f"{row['provider']} | {row['median_us']} | {row['actual_fraction']} | {speedup} | {kernels} | "
            f"{row['collectives']} |"
        )
    path = out / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def plot_comm_model(rows: list[dict], meta: dict, out: Path) -> Path:
    """comm_model.png from measured forward+backward times of one mid-size case."""
    from comm_model import plot

    baseline = "torch_sync" if any(row["provider"] == "torch_sync" for row in rows) else "torch_bn"
    timed = {}
    for row in rows:
        if (
            row["mode"] == "forward+backward"
            and row["provider"] in ("triton_syncbn", baseline)
            and row.get("world_size", 1) == 1
        ):
            timed.setdefault((row["shape"], row["dtype"], row["layout"]), {})[row["provider"]] = row
    chosen = next((key for key in timed if len(timed[key]) == 2), None)
    if chosen is None or meta["device"] != "cuda":
        kernel_us, channels = {"ours": 0.0, "torch": 0.0}, 256
        note = "communication only: single-device kernel times come from a GPU run"
    else:
        pair = timed[chosen]
        kernel_us = {"ours": pair["triton_syncbn"]["median_us"], "torch": pair[baseline]["median_us"]}
        channels = pair["triton_syncbn"]["dims"][1]
        note = f"kernel times: {'/'.join(chosen)} fwd+bwd on {meta['device_name']} ({baseline} for torch)"
    path = out / "comm_model.png"
    ratio = plot(str(path), channels, kernel_us, note)
    print(f"communication model: at 512 GPUs torch's exposed time per layer is {ratio:.1f}x ours ({note})")
    return path


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())
