"""Activations fused after batch norm (and an optional residual add), and their derivatives.

``ACTIVATION`` codes (constexpr): 0 identity, 1 relu, 2 leaky_relu (``negative_slope``), 3 silu.
Backward never saves the activation's input: the kernels recompute it from x, the saved
per-channel statistics, the affine parameters and the residual.
"""

import triton
import triton.language as tl

# Name -> ACTIVATION code, for the launchers.
ACTIVATION_CODES = {"identity": 0, "relu": 1, "leaky_relu": 2, "silu": 3}


@triton.jit
def apply_activation(z, negative_slope, ACTIVATION: tl.constexpr):
    """``act(z)`` elementwise, in z's dtype."""
    out = z
    if ACTIVATION == 1:
        out = tl.where(z < 0.0, 0.0, z)  # not tl.maximum: it drops NaN, torch.relu keeps it
    elif ACTIVATION == 2:
        out = tl.where(z > 0.0, z, z * negative_slope)
    elif ACTIVATION == 3:
        out = z * tl.sigmoid(z)
    return out


@triton.jit
def activation_backward(z, grad, negative_slope, ACTIVATION: tl.constexpr):
    """``grad * act'(z)`` elementwise: the gradient at the activation's input."""
    out = grad
    if ACTIVATION == 1:
        out = tl.where(z > 0.0, grad, 0.0)
    elif ACTIVATION == 2:
        out = tl.where(z > 0.0, grad, grad * negative_slope)
    elif ACTIVATION == 3:
        sigmoid = tl.sigmoid(z)
        out = grad * sigmoid * (1.0 + z * (1.0 - sigmoid))
    return out
