"""Magma in torchtitan's optimizer builder (needs torchtitan; tested with 0.3.0): docs/torchtitan.md.

torchtitan builds its optimizers from the trainer config's ``optimizer`` field, an
``OptimizersContainer.Config`` whose ``param_groups`` give an optimizer name per pattern of
parameter names. The container builds one optimizer per model part (a pipeline stage) and name,
from groups that carry the parameters' names (``param_names``, wrapper prefixes dropped), so each
stage's Magma keys its masks by the unsplit model's names and draws the masks of one Magma over
the whole model::

    from torchtitan.components.optimizer import ParamGroupConfig
    from magma_ext.torchtitan import MagmaOptimizersContainer

    config.optimizer = MagmaOptimizersContainer.Config(
        param_groups=[ParamGroupConfig(pattern=r".*", optimizer_name="Magma",
                                       optimizer_kwargs={"lr": 3e-4, "weight_decay": 0.1})])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch.optim import Optimizer
from torchtitan.components.optimizer import OptimizersContainer

from .optimizer import Magma

__all__ = ["MagmaOptimizersContainer"]


class MagmaOptimizersContainer(OptimizersContainer):
    """torchtitan's ``OptimizersContainer`` that also builds ``optimizer_name="Magma"``.

    ``optimizer_kwargs`` are Magma's keywords. The container's ``implementation`` sets Magma's
    ``fused``: ``"fused"`` (torchtitan's default) requires magma_ext's CUDA kernels, ``"foreach"``
    and ``"for-loop"`` take the PyTorch reference; ``optimizer_kwargs={"fused": None, ...}`` picks
    the kernels wherever they run.

    Before a state dict is saved or loaded, each Magma's state is created by
    :meth:`Magma.init_state`. torchtitan would otherwise create it with a step of zero gradients
    and ``lr=0``, which Magma counts (its masks and bias corrections would then run one step
    ahead of a run that never checkpointed before its first step).
    """

    @dataclass(kw_only=True, slots=True)
    class Config(OptimizersContainer.Config):
        pass

    @staticmethod
    def _resolve_optimizer_factory(name: str) -> Callable[..., Optimizer]:
        if name == "Magma":
            return _magma
        return OptimizersContainer._resolve_optimizer_factory(name)

    def state_dict(self) -> dict[str, Any]:
        self._init_magma_state()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._init_magma_state()
        super().load_state_dict(state_dict)

    def _init_magma_state(self) -> None:
        for optimizer in self.optimizers:
            if isinstance(optimizer, Magma):
                optimizer.init_state()


def _magma(param_groups: list[dict], **kwargs) -> Magma:
    """Magma over torchtitan's groups, less their ``foreach`` flag (Magma has no such option)."""
    return Magma([{key: value for key, value in group.items() if key != "foreach"} for group in param_groups],
                 **kwargs)
