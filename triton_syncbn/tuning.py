"""Opt-in tuning of the elementwise kernels' launch configuration (normalize, input gradient).

Only the kernels that reduce nothing are tuned. Their output is one independent expression per
element with per-channel constants computed the same way in every program, so every
configuration writes the same bits: tuning changes speed, never results, and ranks with
different tables still agree. The reductions (statistics, gradient sums) keep the heuristic
tiling of ``launchers.choose_tiling``, because their block sizes and splits fix the summation
order (bitwise reproducible outputs, gradients and running statistics, equal across ranks).

Tuning happens offline, on a GPU: ``python bench/autotune.py`` times candidate configurations of
a model's shapes, checks that each writes the default's bits, and saves a JSON table;
``triton_syncbn.tuning.use(path)`` makes the launchers read it for the whole process (until
``use(None)``). Nothing is timed on the training path (so nothing during CUDA-graph capture, no
host synchronization); a key the table lacks gets the heuristic configuration.

A key is the kernel, the layout, the element size, the power-of-two buckets of N, C and S and
every constexpr flag fixed before tiling (statistics mode, activation, residual, strides), so a
configuration tuned for one epilogue never serves another.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

# The kernels a table may configure (launchers' names).
KERNELS = ("normalize", "backward_dx")
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ElementwiseConfig:
    """How an elementwise kernel is cut into programs."""

    thread_elements: int  # elements each thread handles per step (a power of two, 1-64)
    num_warps: int  # warps per program (1, 2, 4, 8 or 16)
    steps: int  # steps per program aimed at on large tensors (a power of two, 1-1024)

    def __post_init__(self) -> None:
        for name, value, limit in (("thread_elements", self.thread_elements, 64), ("num_warps", self.num_warps, 16),
                                   ("steps", self.steps, 1024)):  # fmt: skip
            if not (isinstance(value, int) and 1 <= value <= limit and value & (value - 1) == 0):
                raise ValueError(f"{name} must be a power of two from 1 to {limit}, got {value!r}")


def bucket(value: int) -> int:
    """The power of two at or above ``value`` (0 stays 0)."""
    return 0 if value <= 0 else 1 << (value - 1).bit_length()


@dataclass(frozen=True)
class TuningKey:
    kernel: str  # one of KERNELS
    layout: str  # "contiguous" | "channels_last" (launchers.layout_of)
    itemsize: int  # bytes per element of the input
    batch: int  # bucket(N) of the [N, C, S] view
    channels: int  # bucket(C)
    spatial: int  # bucket(S)
    flags: tuple[tuple[str, bool | int], ...]  # the launch's constexpr flags fixed before tiling, sorted

    @classmethod
    def of(
        cls, kernel: str, layout: str, shape: tuple[int, ...], itemsize: int, flags: dict[str, bool | int]
    ) -> TuningKey:
        """The key of a launch on an ``[N, C, S]`` view of ``shape``."""
        if kernel not in KERNELS:
            raise ValueError(f"only the elementwise kernels {KERNELS} are tuned, not {kernel!r}")
        batch, channels, spatial = shape
        return cls(
            kernel, layout, itemsize, bucket(batch), bucket(channels), bucket(spatial), tuple(sorted(flags.items()))
        )

    def encode(self) -> str:
        return json.dumps({**asdict(self), "flags": dict(self.flags)}, sort_keys=True)

    @classmethod
    def decode(cls, text: str) -> TuningKey:
        fields = json.loads(text)
        return cls(**{**fields, "flags": tuple(sorted(fields["flags"].items()))})


class TuningTable:
    """Tuned configurations by key, with where they were measured (``meta``: GPU, versions)."""

    def __init__(self, entries: dict[TuningKey, ElementwiseConfig] | None = None, meta: dict | None = None) -> None:
        self.entries = dict(entries or {})
        self.meta = dict(meta or {})

    def lookup(self, key: TuningKey) -> ElementwiseConfig | None:
        return self.entries.get(key)

    def save(self, path: str | Path) -> None:
        data = {
            "format": FORMAT_VERSION,
            "meta": self.meta,
            "entries": [
                {"key": json.loads(key.encode()), "config": asdict(config)} for key, config in self.entries.items()
            ],
        }
        Path(path).write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> TuningTable:
        data = json.loads(Path(path).read_text())
        if data.get("format") != FORMAT_VERSION:
            raise ValueError(f"{path}: tuning table format {data.get('format')!r}, expected {FORMAT_VERSION}")
        entries = {}
        for entry in data["entries"]:
            key = TuningKey.decode(json.dumps(entry["key"]))
            if key.kernel not in KERNELS:
                raise ValueError(f"{path}: an entry for {key.kernel!r}; only {KERNELS} are tuned")
            entries[key] = ElementwiseConfig(**entry["config"])
        return cls(entries, data.get("meta"))


class UniformTable(TuningTable):
    """A table that answers every key with one configuration: how ``bench/autotune.py`` runs a
    candidate, and how the tests force one."""

    def __init__(self, config: ElementwiseConfig) -> None:
        super().__init__()
        self.config = config

    def lookup(self, key: TuningKey) -> ElementwiseConfig:
        return self.config


_active: TuningTable | None = None


def use(table: TuningTable | str | Path | None) -> TuningTable | None:
    """Make the launchers read ``table`` (a ``TuningTable`` or the path of a saved one) from now
    on, in this process; ``None`` returns to the heuristic everywhere. Returns the table."""
    global _active
    _active = TuningTable.load(table) if isinstance(table, (str, Path)) else table
    return _active


def active() -> TuningTable | None:
    """The table ``use`` installed, or None."""
    return _active
