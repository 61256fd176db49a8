"""The benchmark shapes of PERF.md, and the small CPU set derived from them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    id: str
    dims: tuple[int, ...]  # (N, C, *spatial)
    what: str

    @property
    def numel(self) -> int:
        total = 1
        for size in self.dims:
            total *= size
        return total

    @property
    def has_channels_last(self) -> bool:
        return len(self.dims) in (4, 5)


# PERF.md, "Shapes (N, C, spatial)".
GPU_SHAPES = [
    Shape("S1", (32, 2048, 7, 7), "ResNet-50 layer4: small, latency-bound"),
    Shape("S2", (256, 4096), "BatchNorm1d in an SSL projection head"),
    Shape("S3", (32, 64, 112, 112), "ResNet stem: few channels, many elements each"),
    Shape("S4", (32, 256, 56, 56), "ResNet layer1"),
    Shape("S5", (128, 512, 28, 28), "ResNet layer2, large batch"),
    Shape("S6", (256, 256, 56, 56), "large, bandwidth-bound"),
    Shape("S7", (2, 256, 200, 336), "Mask R-CNN, 2 images per GPU"),
    Shape("S8", (1024, 256, 7, 7), "RoI box head"),
    Shape("S9", (2, 2048, 97, 97), "DeepLabv3 output stride 8"),
    Shape("S10", (8, 64, 8, 56, 56), "video, 5-D"),
    Shape("S11", (2, 32, 128, 128, 128), "3-D U-Net, 5-D"),
    Shape("S12", (20, 6, 65536), "few channels, long rows"),
]

# The same families, scaled so that the default CPU run takes minutes on 2 cores (0.1-0.5 MB
# fp32 per rank: latency-bound, where per-call overhead shows), then the per-rank shapes a CPU
# training job really has (6-13 MB: bandwidth-bound), measured in issue 13.
CPU_SHAPES = [
    Shape("S1", (8, 256, 7, 7), "S1 scaled for CPU: ResNet-50 layer4"),
    Shape("S2", (64, 1024), "S2 scaled for CPU: BatchNorm1d"),
    Shape("S3", (4, 32, 56, 56), "S3 scaled for CPU: few channels"),
    Shape("S4", (4, 64, 28, 28), "S4 scaled for CPU: ResNet layer1"),
    Shape("S10", (2, 16, 4, 14, 14), "S10 scaled for CPU: video, 5-D"),
    Shape("S12", (4, 6, 8192), "S12 scaled for CPU: few channels, long rows"),
    Shape("C1", (8, 64, 56, 56), "CPU mid: ResNet layer1, 8 images per rank"),
    Shape("C2", (32, 256, 14, 14), "CPU mid: ResNet layer3, 32 images per rank"),
    Shape("C3", (256, 1024), "CPU mid: BatchNorm1d, projection head"),
]

# Tiny shapes for the Triton interpreter (--interpret), which runs programs one by one in Python.
INTERPRETER_SHAPES = [
    Shape("T1", (4, 16, 4, 4), "tiny 4-D"),
    Shape("T2", (16, 32), "tiny 2-D"),
]


def select(shapes: list[Shape], wanted: list[str] | None) -> list[Shape]:
    """Filter ``shapes`` by id (case-insensitive); unknown ids are an error listing the known ones."""
    if not wanted:
        return shapes
    known = {shape.id.lower(): shape for shape in shapes}
    missing = [name for name in wanted if name.lower() not in known]
    if missing:
        raise SystemExit(f"unknown shape ids {missing}; known here: {[shape.id for shape in shapes]}")
    return [known[name.lower()] for name in wanted]
