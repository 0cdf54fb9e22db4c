"""dma_torch: Dynamic Mask Attention (Shi et al. 2025) for PyTorch.

    from dma_torch import dma_attention, DynamicMaskAttention

dma_attention is the differentiable op (CPU: the tiled C++ code of core/; CUDA: the kernels of
cuda/), DynamicMaskAttention a drop-in attention layer built on it. See README.md.
"""
import torch  # noqa: F401  (first: _C links against torch's libraries)

from . import _C
from .decode import DMACache
from .modules import DynamicMaskAttention
from .ops import HAS_CUSTOM_OP, DMAError, dma_attention, set_cuda_checks

__all__ = ["dma_attention", "DynamicMaskAttention", "DMAError", "set_cuda_checks", "build_info",
           "HAS_CUSTOM_OP", "DMACache"]
__version__ = "0.1.0"


def build_info():
    """How this extension was built: {'eigen', 'cuda', 'cpu_path', 'custom_op'}."""
    info = dict(_C.build_info())
    info["custom_op"] = HAS_CUSTOM_OP
    return info
