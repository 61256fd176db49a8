"""Viewing batch-norm tensors as ``[N, C, S]`` without copies."""

from __future__ import annotations

import torch


def channel_view(tensor: torch.Tensor) -> torch.Tensor:
    """Return ``tensor`` of shape ``(N, C, *spatial)`` as an ``[N, C, S]`` view, S = prod(spatial).

    Contiguous, channels_last / channels_last_3d, broadcast (stride 0) and most sliced tensors
    give a true view, so kernels read them in place through their strides. Only a tensor whose
    spatial dims cannot be merged into one stride is copied (to contiguous).
    """
    batch, channels = tensor.shape[:2]
    spatial = _spatial_size(tensor)
    try:
        return tensor.view(batch, channels, spatial)
    except RuntimeError:
        return tensor.contiguous().view(batch, channels, spatial)


def empty_output_like(source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An uninitialized tensor shaped like ``source`` plus its ``[N, C, S]`` view.

    The output keeps ``source``'s dtype, device and memory format (contiguous, channels_last,
    channels_last_3d) where that layout can be viewed as ``[N, C, S]``; otherwise it is
    contiguous. The view is always a true view, so kernels writing through it fill the tensor.
    """
    output = torch.empty_like(source, memory_format=torch.preserve_format)
    batch, channels = source.shape[:2]
    spatial = _spatial_size(source)
    try:
        return output, output.view(batch, channels, spatial)
    except RuntimeError:
        output = torch.empty_like(source, memory_format=torch.contiguous_format)
        return output, output.view(batch, channels, spatial)


def _spatial_size(tensor: torch.Tensor) -> int:
    spatial = 1
    for size in tensor.shape[2:]:
        spatial *= size
    return spatial


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics and reductions run in float64 for float64 input and in float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32
