"""The vocabulary shared by every path of the Magma step: choices, hyperparameters, tensor lists.

Nothing here computes anything; :mod:`magma_ext.reference`, :mod:`magma_ext.fused` and
:mod:`magma_ext.functional` all speak these types, so none of them depends on another for them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .layout import BlockLayout

BASES = ("adam", "rmsprop", "laprop")
MASKS = ("magma", "skip", "none")


@dataclass
class Hyper:
    """Hyperparameters of one step of one parameter group."""

    lr: float | torch.Tensor
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    base: str
    mask: str
    keep_prob: float
    tau: float
    score_ema: float
    seed: int


@dataclass
class GroupTensors:
    """The lists one step works on: entry ``i`` of every list belongs to parameter ``i``.

    ``master_params[i]`` is the float32 master copy or None; ``master_remainders[i]`` (None
    for the whole list where no entry has one) the int16 low half of a bfloat16 parameter's
    master (:mod:`magma_ext.param_remainders`) or None; ``layouts[i]`` says how the
    parameter (or piece of a logical tensor) is cut into blocks and ``tensor_indices[i]`` is
    its frozen tensor index.
    """

    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    exp_avgs: list[torch.Tensor]
    exp_avg_sqs: list[torch.Tensor]
    scores: list[torch.Tensor]
    steps: list[torch.Tensor]
    master_params: list[torch.Tensor | None]
    layouts: list[BlockLayout]
    tensor_indices: list[int]
    master_remainders: list[torch.Tensor | None] | None = None

    def num_blocks(self) -> int:
        """Rows of this list's ``block_sums``: the blocks of every entry, in list order."""
        return sum(layout.num_blocks for layout in self.layouts)
