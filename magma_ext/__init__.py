"""magma_ext: Magma (momentum-aligned gradient masking) for PyTorch, with fused CUDA kernels."""

from ._ops import has_cuda_extension
from .optimizer import Magma
from .names import name_index
from .param_groups import decay_groups, param_groups
from .pieces import Piece, declare_piece, number_parameters, piece_of

__all__ = [
    "Magma", "decay_groups", "param_groups", "has_cuda_extension",
    "Piece", "declare_piece", "name_index", "number_parameters", "piece_of",
]
__version__ = "0.1.0"
