"""triton-syncbn: drop-in synchronized BatchNorm for PyTorch, fused in Triton kernels.

    import triton_syncbn
    model = triton_syncbn.convert_sync_batchnorm(model)   # before DistributedDataParallel

Importing this package touches no GPU and reads no environment variable of its own.
"""

from .convert import convert_sync_batchnorm, revert_sync_batchnorm
from .functional import sync_batch_norm
from .module import SyncBatchNorm

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm", "revert_sync_batchnorm", "sync_batch_norm"]
__version__ = "0.1.0"
