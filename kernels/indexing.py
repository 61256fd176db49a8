"""Index and parameter helpers shared by every kernel.

Every kernel sees its tensors as ``[N, C, S]`` views with explicit strides, so contiguous
(``stride_s == 1``) and channels_last (``stride_c == 1``) inputs are read without copies. A
program owns a block of ``BLOCK_C`` channels and walks a range of the ``M = N * S`` elements of
each channel, ``BLOCK_M`` at a time; element ``m`` of a channel is sample ``m // S``, spatial
position ``m % S``.
"""

import triton
import triton.language as tl


@triton.jit
def split_elements(elements, spatial_size, INT64: tl.constexpr):
    """Split flat per-channel element indices ``[BLOCK_M]`` into (sample, spatial) indices.

    With ``INT64`` the indices are widened first, so that ``index * stride`` cannot overflow
    32 bits on tensors of 2**31 elements or more.
    """
    if INT64:
        elements = elements.to(tl.int64)
    sample = elements // spatial_size
    spatial = elements - sample * spatial_size
    return sample, spatial


@triton.jit
def tile_offsets(
    channels, sample, spatial, stride_n, stride_c, stride_s, INT64: tl.constexpr, SPATIAL_VEC: tl.constexpr
):
    """Element offsets ``[BLOCK_C, BLOCK_M]`` of a channel block x element block tile.

    ``SPATIAL_VEC > 1`` (set by the launcher only when ``stride_s == 1`` and S, ``stride_n`` and
    ``stride_c`` are multiples of it) tells the compiler that each aligned run of SPATIAL_VEC
    elements is contiguous and aligned: the flat index hides that (a run never straddles two
    samples when S is a multiple of the run), and with it loads and stores become 128-bit.
    """
    if INT64:
        channels = channels.to(tl.int64)
    offsets = channels[:, None] * stride_c + (sample * stride_n + spatial * stride_s)[None, :]
    if SPATIAL_VEC > 1:
        offsets = tl.max_contiguous(tl.multiple_of(offsets, [1, SPATIAL_VEC]), [1, SPATIAL_VEC])
    return offsets


@triton.jit
def load_affine(weight_ptr, bias_ptr, channels, channel_mask, ACC_DTYPE: tl.constexpr):
    """Per-channel ``(weight, bias)`` ``[BLOCK_C]``; 1 and 0 where the pointer is None."""
    if weight_ptr is not None:
        weight = tl.load(weight_ptr + channels, mask=channel_mask, other=1.0).to(ACC_DTYPE)
    else:
        weight = tl.full(channels.shape, 1.0, ACC_DTYPE)
    if bias_ptr is not None:
        bias = tl.load(bias_ptr + channels, mask=channel_mask, other=0.0).to(ACC_DTYPE)
    else:
        bias = tl.zeros(channels.shape, ACC_DTYPE)
    return weight, bias
