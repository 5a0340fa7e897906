"""``magma_ext.Magma``: the torch.optim.Optimizer.

The class is glue: it validates hyperparameters, creates state lazily, gathers each group's
tensors per device and hands them to the fused CUDA step or to the reference in
``reference.py``.  See docs/ALGORITHM.md for the algorithm and its contract.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch.optim import Optimizer

from . import _ops
from .fused import FusedPlan, fused_plan, fused_run
from .layout import MAX_TENSOR_INDEX, layout_for
from .options import check_group_options
from .reference import BlockIndex, GroupTensors, Hyper, build_block_index, magma_step

LOW_PRECISION = (torch.bfloat16, torch.float16)
REAL_FLOATS = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))
FLOAT32_STATE = ("exp_avg", "exp_avg_sq", "magma_score", "master_param")
_CACHE_LIMIT = 64


class Magma(Optimizer):
    r"""Momentum-aligned gradient masking (Magma, arXiv 2602.15322) over Adam, RMSProp or LaProp.

    The base optimizer updates its moments densely; each parameter block then applies its
    update only with probability ``keep_prob`` (a deterministic Philox draw), scaled by an EMA
    of ``sigmoid(cos(momentum, gradient) / tau)``::

        theta <- theta - lr * s_t * z_t * (D_t + weight_decay * theta)

    Args:
        params: parameters or parameter groups; a group may override any keyword below and may
            set ``"magma": False`` to never be masked (mask "none").
        lr: learning rate, a float or a one-element tensor.
        betas: coefficients of the first and second moments.
        eps: added to the denominator.
        weight_decay: decoupled (AdamW-style) weight decay, masked and modulated with the update.
        base: "adam", "rmsprop" or "laprop": the base optimizer's direction D_t.
        mask: "magma" (score-modulated, the default), "skip" (unbiased z / keep_prob) or "none"
            (the dense base optimizer; with base "adam" this is AdamW).
        keep_prob: probability that a block applies its update on a step.
        tau: temperature of the alignment score.
        score_ema: EMA coefficient of the score.
        block: "tensor" (each tensor is one block), "row" (each slice along dim 0) or an int N
            (chunks of N contiguous elements).
        seed: unsigned 64-bit key of the mask generator.
        fused: None picks the CUDA kernels when they are built and every parameter of a group
            is on a CUDA device; True requires them; False always uses the PyTorch reference.
        master_weights: keep a float32 master copy of bfloat16/float16 parameters.
        capturable: keep every step value on the device so that the step can be captured in a
            CUDA graph (the step counter always lives on the parameter's device here).
    """

    _step_supports_amp_scaling = True

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        base: str = "adam",
        mask: str = "magma",
        keep_prob: float = 0.5,
        tau: float = 2.0,
        score_ema: float = 0.9,
        block: str | int = "tensor",
        seed: int = 0,
        fused: bool | None = None,
        master_weights: bool = False,
        capturable: bool = False,
    ):
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, base=base, mask=mask,
            keep_prob=keep_prob, tau=tau, score_ema=score_ema, block=block, seed=seed,
            magma=True, fused=fused, master_weights=master_weights, capturable=capturable,
        )
        _check_group(defaults)
        self._plans: dict = {}
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ groups and state

    def add_param_group(self, param_group: dict) -> None:
        """Add a group after validating its parameters and merged hyperparameters."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        params = param_group["params"]
        if isinstance(params, torch.Tensor):
            params = [params]
        elif isinstance(params, set):
            raise TypeError("params must be an ordered iterable of tensors, not a set")
        params = list(params)
        seen = {id(p) for group in getattr(self, "param_groups", []) for p in group["params"]}
        for p in params:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"params must contain tensors, got {type(p).__name__}")
            if p.is_complex() or not p.is_floating_point():
                raise TypeError(f"params must be real floating-point tensors, got dtype {p.dtype}")
            if id(p) in seen:
                raise ValueError("a parameter appears more than once in params; list each parameter once")
            seen.add(id(p))
        merged = {**self.defaults, **param_group, "params": params}
        _check_group(merged)
        if merged["fused"]:
            _check_fused_params(params)
        super().add_param_group({**param_group, "params": params})

    def _tensor_indices(self) -> dict[int, int]:
        """Position of every parameter over param_groups, in order (its tensor index)."""
        positions = (p for group in self.param_groups for p in group["params"])
        return {id(p): i for i, p in enumerate(positions)}

    def _init_state(self, p: torch.Tensor, group: dict, tensor_index: int) -> None:
        if tensor_index >= MAX_TENSOR_INDEX:
            raise ValueError(f"tensor index {tensor_index} does not fit the 32-bit RNG field")
        state = self.state[p]
        as_float = dict(dtype=torch.float32, device=p.device)
        state["step"] = torch.zeros((), **as_float)
        state["exp_avg"] = torch.zeros(p.shape, **as_float)
        state["exp_avg_sq"] = torch.zeros(p.shape, **as_float)
        blocks = layout_for(tuple(p.shape), group["block"]).num_blocks
        state["magma_score"] = torch.full((blocks,), 0.5, **as_float)
        state["magma_tensor_index"] = tensor_index
        if group["master_weights"] and p.dtype in LOW_PRECISION:
            state["master_param"] = p.detach().to(torch.float32).clone()

    def load_state_dict(self, state_dict: dict) -> None:
        """Load state, keeping moments, scores and master weights in float32 on the param's device.

        torch.optim casts floating-point state to the parameter's dtype; that would round the
        float32 moments of a bfloat16 parameter, so the loaded values are put back afterwards.
        """
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        self._plans.clear()
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for param_id, p in zip(saved_ids, params):
            if param_id not in saved:
                continue
            for key, value in saved[param_id].items():
                if key == "step" or key in FLOAT32_STATE:
                    self.state[p][key] = value.to(dtype=torch.float32, device=p.device).clone()
        for group in self.param_groups:
            _check_group(group)

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss.

        Honours ``grad_scale`` and ``found_inf`` attributes set by ``torch.amp.GradScaler``: grads
        are divided by ``grad_scale`` and the whole step is skipped where ``found_inf`` is set.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        # Check every group before touching anything, so that an error changes nothing.
        work = [self._params_with_grad(group) for group in self.param_groups]
        active = [(group, params, self._plan_key(group, params))
                  for group, params in zip(self.param_groups, work) if params]
        for group, params, key in active:
            if key not in self._plans:
                self._check_layouts(group, params)
        indices = None
        group_states = []
        for group, params, _ in active:
            states = [self.state[p] for p in params]
            new = [p for p, state in zip(params, states) if not state]
            if new and indices is None:
                indices = self._tensor_indices()
            for p in new:
                self._init_state(p, group, indices[id(p)])
            group_states.append(states)
        for (group, params, key), states in zip(active, group_states):
            plans = self._plan(key, group, params)
            for plan in plans:
                if len(plans) > 1:
                    states = [self.state[p] for p in plan.params]
                self._step_device(group, plan, states, grad_scale, found_inf)
        return loss

    def _params_with_grad(self, group: dict) -> list[torch.Tensor]:
        params = []
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            if grad.layout is not torch.strided or grad.dtype not in REAL_FLOATS or grad.shape != p.shape:
                _raise_bad_grad(p, grad)
            params.append(p)
        if params and group["fused"]:
            _check_fused_params(params)
        return params

    @staticmethod
    def _plan_key(group: dict, params: list[torch.Tensor]) -> tuple:
        return (id(group), group["block"], group["fused"], tuple(map(id, params)))

    def _check_layouts(self, group: dict, params: list[torch.Tensor]) -> None:
        """Grads on their params' devices; block unchanged for parameters that have state."""
        for p in params:
            if p.grad.device != p.device:
                raise ValueError(f"grad on {p.grad.device} but param on {p.device}")
            state = self.state[p]
            if not state:
                continue
            blocks = layout_for(tuple(p.shape), group["block"]).num_blocks
            if state["magma_score"].numel() != blocks:
                raise ValueError(
                    f"block={group['block']!r} gives {blocks} blocks for a parameter whose "
                    f"magma_score has {state['magma_score'].numel()}: block cannot change mid-run"
                )

    def _plan(self, key: tuple, group: dict, params: list[torch.Tensor]) -> list[_DevicePlan]:
        """What does not change from step to step for these parameters: cached under ``key``."""
        plans = self._plans.get(key)
        if plans is None:
            if len(self._plans) >= _CACHE_LIMIT:
                self._plans.clear()
            plans = [self._plan_device(group, device, members) for device, members in _by_device(params).items()]
            self._plans[key] = plans
        return plans

    def _plan_device(self, group: dict, device, params: list[torch.Tensor]) -> _DevicePlan:
        layouts = [layout_for(tuple(p.shape), group["block"]) for p in params]
        indices = [self.state[p]["magma_tensor_index"] for p in params]
        masters = [self.state[p].get("master_param") is not None for p in params]
        if _use_fused(group["fused"], params):
            return _DevicePlan(device, params, layouts, indices, fused_plan(params, masters, layouts, indices))
        return _DevicePlan(device, params, layouts, indices, None)

    def _step_device(self, group, plan: _DevicePlan, states: list[dict], grad_scale, found_inf) -> None:
        tensors = GroupTensors(
            params=plan.params,
            grads=[p.grad for p in plan.params],
            exp_avgs=[s["exp_avg"] for s in states],
            exp_avg_sqs=[s["exp_avg_sq"] for s in states],
            scores=[s["magma_score"] for s in states],
            steps=[s["step"] for s in states],
            master_params=[s.get("master_param") for s in states],
            layouts=plan.layouts,
            tensor_indices=plan.tensor_indices,
        )
        hyper = Hyper(
            lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1], eps=group["eps"],
            weight_decay=group["weight_decay"], base=group["base"],
            mask=group["mask"] if group["magma"] else "none", keep_prob=group["keep_prob"],
            tau=group["tau"], score_ema=group["score_ema"], seed=group["seed"],
        )
        if grad_scale is not None:
            grad_scale = grad_scale.to(plan.device, non_blocking=True)
        if found_inf is not None:
            found_inf = found_inf.to(plan.device, non_blocking=True)
        if plan.fused is not None:
            fused_run(plan.fused, tensors, hyper, grad_scale, found_inf)
        else:
            magma_step(tensors, hyper, self._block_index(plan), grad_scale, found_inf)

    def _block_index(self, plan: _DevicePlan) -> BlockIndex:
        if plan.block_index is None:
            plan.block_index = build_block_index(plan.layouts, plan.tensor_indices, plan.device)
        return plan.block_index


@dataclass
class _DevicePlan:
    """The parts of a group's step on one device that stay the same from step to step."""

    device: torch.device
    params: list[torch.Tensor]
    layouts: list
    tensor_indices: list[int]
    fused: FusedPlan | None
    block_index: BlockIndex | None = None


def _raise_bad_grad(p: torch.Tensor, grad: torch.Tensor) -> None:
    if grad.layout is not torch.strided:
        raise TypeError(f"Magma does not support sparse gradients (grad layout {grad.layout})")
    if grad.dtype not in REAL_FLOATS:
        raise TypeError(f"Magma needs real floating-point gradients, got grad dtype {grad.dtype}")
    raise ValueError(f"grad shape {tuple(grad.shape)} does not match param shape {tuple(p.shape)}")


def _check_group(group: dict) -> None:
    check_group_options(group)
    if group["fused"] not in (None, True, False):
        raise TypeError(f"fused must be None, True or False, got {group['fused']!r}")
    for name in ("master_weights", "capturable"):
        if not isinstance(group[name], bool):
            raise TypeError(f"{name} must be a bool, got {type(group[name]).__name__}")
    if group["fused"] and not _ops.has_cuda_extension():
        raise RuntimeError(
            "fused=True needs magma_ext's CUDA extension, which is not loaded "
            f"({_ops.load_error()}); reinstall with a CUDA-enabled torch and nvcc, or use fused=None"
        )


def _fusable(p: torch.Tensor) -> bool:
    return p.is_cuda and p.dtype in _ops.FUSED_DTYPES and p.is_contiguous()


def _check_fused_params(params) -> None:
    bad = [p for p in params if not _fusable(p)]
    if bad:
        raise RuntimeError(
            "fused=True requires every parameter to be a contiguous CUDA tensor of dtype float32, "
            f"bfloat16 or float16; got {bad[0].dtype} on {bad[0].device}"
            f"{'' if bad[0].is_contiguous() else ' (not contiguous)'}"
        )


def _use_fused(fused, params) -> bool:
    if fused is False or not _ops.has_cuda_extension():
        return False
    return all(_fusable(p) for p in params)


def _by_device(params):
    grouped = defaultdict(list)
    for p in params:
        grouped[p.device].append(p)
    return grouped
