"""``magma_ext.Magma``: the torch.optim.Optimizer.

The class is glue: it validates hyperparameters, creates state lazily, gathers each group's
tensors per device and hands them to :func:`magma_ext.functional.magma`, which picks the fused
CUDA ops or the PyTorch reference.  See docs/ALGORITHM.md for the algorithm and its contract.
"""

from __future__ import annotations

import inspect
import warnings
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch.optim import Optimizer

from . import functional, shards
from .distributed import BlockSumExchange, PieceDescriptor
from .layout import MAX_TENSOR_INDEX, BlockLayout, layout_for
from .options import check_group_options, options_key
from .pieces import Piece, ProcessGroup, piece_of
from .types import GroupTensors, Hyper

LOW_PRECISION = (torch.bfloat16, torch.float16)
REAL_FLOATS = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))
FLOAT32_STATE = ("step", "exp_avg", "exp_avg_sq", "magma_score", "master_param")
# Keys of torch.optim.AdamW's groups that would change its update; Magma has no such option.
UNSUPPORTED_TORCH_OPTIONS = ("amsgrad", "maximize")
_CACHE_LIMIT = 64
_warned_no_extension = False


class Magma(Optimizer):
    r"""Momentum-aligned gradient masking (Magma, arXiv 2602.15322) over Adam, RMSProp or LaProp.

    The base optimizer updates its moments densely; each parameter block then applies its
    update only with probability ``keep_prob`` (a deterministic Philox draw), scaled by an EMA
    of ``sigmoid(cos(momentum, gradient) / tau)``::

        theta <- theta - lr * s_t * z_t * (D_t + weight_decay * theta)

    Args:
        params: parameters, ``(name, parameter)`` pairs such as ``model.named_parameters()``
            (the names are kept in each group's ``param_names``, as torch.optim does), or
            parameter groups; a group may override any keyword below and may set
            ``"magma": False`` to never be masked (mask "none").
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
        seed: unsigned 64-bit key of the mask generator (anything ``operator.index`` takes).
        fused: None picks the CUDA kernels when they are built and every parameter of a group
            is on a CUDA device (warning once if CUDA parameters find no extension); True
            requires them; False always uses the PyTorch reference.
        master_weights: keep a float32 master copy of bfloat16/float16 parameters.
        capturable: accepted for torch.optim API parity and otherwise unused: the step counter
            always lives on the parameter's device and no path synchronises with the host, so
            every step can be captured in a CUDA graph.
        process_group: for engines that hand Magma pieces of tensors (``declare_piece``) and may
            leave a rank with no piece of a parameter group (a ZeRO-style optimizer, say): the
            process group whose ranks all step every masked group together, or a list of such
            groups (those the pieces name: Megatron's tensor-and-data-parallel group and its
            data-parallel group, say). Every such group's block sums are then exchanged over
            each of them on every rank, an empty one included, so no rank waits for one that had
            nothing to send. Not saved in ``state_dict()``, and not kept by a copy or pickle of
            the optimizer (process groups are not picklable): set ``optimizer.process_group``
            again there.

    Hyperparameters written into ``param_groups`` after construction are checked before the
    next step that uses them.
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
        process_group=None,
    ):
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, base=base, mask=mask,
            keep_prob=keep_prob, tau=tau, score_ema=score_ema, block=block, seed=seed,
            magma=True, fused=fused, master_weights=master_weights, capturable=capturable,
        )
        _check_group(defaults)
        _check_process_groups(process_group)
        self.process_group = process_group
        self._reset_caches()
        super().__init__(params, defaults)
        _refuse_unnumbered_zero(self.param_groups)

    def _reset_caches(self) -> None:
        self._plans: dict = {}
        self._checked_options: dict[int, tuple] = {}

    def __setstate__(self, state: dict) -> None:
        """Restore a pickled or deep-copied optimizer; its caches are rebuilt on the next step."""
        super().__setstate__(state)
        self.process_group = None
        self._reset_caches()

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
        params, names = _split_names(list(params))
        seen = {id(p) for group in getattr(self, "param_groups", []) for p in group["params"]}
        for p in params:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"params must contain tensors, got {type(p).__name__}")
            if p.is_complex() or not p.is_floating_point():
                raise TypeError(f"params must be real floating-point tensors, got dtype {p.dtype}")
            if id(p) in seen:
                raise ValueError("a parameter appears more than once in params; list each parameter once")
            seen.add(id(p))
        group = {**param_group, "params": params}
        if names is not None:
            group["param_names"] = names
        merged = {**self.defaults, **group}
        _check_group(merged)
        if merged["fused"]:
            _check_fused_params(params)
        super().add_param_group(group)

    def _tensor_indices(self) -> dict[int, int]:
        """Position of every parameter over param_groups, in order (its default tensor index)."""
        positions = (p for group in self.param_groups for p in group["params"])
        return {id(p): i for i, p in enumerate(positions)}

    def _new_tensor_indices(self, new_params: list[torch.Tensor]) -> dict[int, int]:
        """Tensor indices for parameters seen for the first time: their positions, unless a
        parameter with state already holds that index (after groups were removed by hand);
        such a parameter takes the next index above all in use, so no index is ever reused."""
        positions = self._tensor_indices()
        held = {state["magma_tensor_index"] for state in self.state.values() if "magma_tensor_index" in state}
        held |= {piece.index for group in self.param_groups for piece in map(piece_of, group["params"]) if piece}
        indices = _fresh_indices([positions[id(p)] for p in new_params], held, len(positions))
        return {id(p): index for p, index in zip(new_params, indices)}

    def _init_state(self, p: torch.Tensor, group: dict, tensor_index: int, view: shards.ParamView,
                    layout: BlockLayout) -> None:
        if tensor_index >= MAX_TENSOR_INDEX:
            raise ValueError(f"tensor index {tensor_index} does not fit the 32-bit RNG field")
        state = self.state[p]
        state["step"] = torch.zeros((), dtype=torch.float32, device=view.local.device)
        state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
        _add_magma_state(state, p, group, tensor_index, view, layout)

    @torch.no_grad()
    def init_state(self) -> None:
        """Create the state of every parameter that has none, as its first step would.

        Local (no communication), so a wrapper may call it while it builds a checkpoint
        template (Megatron-core's ``init_state_fn``). Pieces must be declared before.
        """
        new = [p for group in self.param_groups for p in group["params"] if not self.state[p]]
        if not new:
            return
        indices = self._new_tensor_indices(new)
        names = self._names()
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) in indices and not self.state[p]:
                    view = shards.view_of(p, indices[id(p)], group["block"], names[id(p)])
                    index = indices[id(p)] if view.piece is None else view.piece.index
                    self._init_state(p, group, index, view, view.layout(group["block"]))

    def state_dict(self) -> dict:
        """torch.optim's state dict, Magma's state included (docs/ALGORITHM.md section 5).

        Under ``block=N`` a DTensor parameter's score is a per-rank tensor of the blocks its shard
        overlaps; the state dict holds the scores of all its blocks instead, as a ``Replicate()``
        DTensor, so that ``torch.distributed.checkpoint`` reshards it.  That takes one
        all-reduce per such parameter over its shard group: call it on every rank, as DCP does.
        """
        packed = super().state_dict()
        position = 0
        for group in self.param_groups:
            for p in group["params"]:
                state = packed["state"].get(position)
                if state is not None and "magma_score" in state and shards.has_local_block_scores(p, group["block"]):
                    view = shards.view_of(p, 0, group["block"], "")
                    full = shards.full_block_scores(p, view, view.layout(group["block"]), group["block"],
                                                    state["magma_score"])
                    packed["state"][position] = {**state, "magma_score": full}  # the live dict stays
                position += 1
        return packed

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a Magma or ``torch.optim.AdamW`` checkpoint; a failed load changes nothing.

        Everything is checked before anything is installed.  Groups that lack Magma's keys (an
        AdamW checkpoint) keep this optimizer's values for them; state without a score or tensor
        index gets them as on a first step.  Moments, scores and master weights stay float32 on
        the parameter's device (torch.optim would cast them to a bfloat16 parameter's dtype),
        and a ``step`` saved as a Python number becomes a float32 tensor; state without a
        ``step`` takes its group's ``"step"`` where the group has one (Megatron-core's distributed
        optimizer saves the step there when Transformer Engine or apex is installed).
        """
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"loaded state dict has {len(saved_groups)} parameter groups, this optimizer has "
                f"{len(self.param_groups)}"
            )
        groups = []
        for i, (current, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(saved["params"]) != len(current["params"]):
                raise ValueError(
                    f"loaded parameter group {i} has {len(saved['params'])} parameters, this "
                    f"optimizer's has {len(current['params'])}"
                )
            for key in UNSUPPORTED_TORCH_OPTIONS:
                if saved.get(key):
                    raise ValueError(f"loaded parameter group {i} sets {key}=True, which Magma does not support")
            group = {**{k: v for k, v in current.items() if k != "params"}, **saved}
            _check_group(group, where=f"loaded parameter group {i}: ")
            if group["fused"]:
                _check_fused_params(current["params"])
            groups.append(group)
        saved_state = state_dict["state"]
        params = [p for group in self.param_groups for p in group["params"]]
        saved_ids = [i for group in saved_groups for i in group["params"]]
        loaded = {}
        for position, (param_id, p) in enumerate(zip(saved_ids, params)):
            if param_id in saved_state:
                group = groups[_group_of(self.param_groups, position)]
                saved = saved_state[param_id]
                if "step" not in saved and group.get("step") is not None:
                    saved = {**saved, "step": group["step"]}
                loaded[param_id] = _loaded_state(saved, p, group, position)
        missing = [(param_id, position) for position, param_id in enumerate(saved_ids)
                   if param_id in loaded and "magma_tensor_index" not in loaded[param_id]]
        held = {s["magma_tensor_index"] for s in loaded.values() if "magma_tensor_index" in s}
        held |= {piece.index for piece in map(piece_of, params) if piece is not None}
        unnumbered = [position for _, position in missing if piece_of(params[position]) is None]
        fresh = dict(zip(unnumbered, _fresh_indices(unnumbered, held, len(params))))
        for param_id, position in missing:
            group = groups[_group_of(self.param_groups, position)]
            piece = piece_of(params[position])
            index = piece.index if piece is not None else fresh[position]
            _add_magma_state(loaded[param_id], params[position], group, index)
        super().load_state_dict({"state": loaded, "param_groups": groups})
        self._reset_caches()
        for param_id, p in zip(saved_ids, params):  # torch.optim cast these to p's dtype
            if param_id in loaded:
                self.state[p].update(loaded[param_id])

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
        for group in self.param_groups:
            self._check_options(group)
        work = [self._params_with_grad(group) for group in self.param_groups]
        active = [(group, params, _plan_key(group, params))
                  for group, params in zip(self.param_groups, work) if params]
        for group, params, key in active:
            if key not in self._plans:
                self._check_layouts(group, params)
        new = [p for _, params, _ in active for p in params if not self.state[p]]
        indices = self._new_tensor_indices(new) if new else {}
        # Plans first, group by group in order: a sharded group's plan exchanges its pieces with
        # the other ranks (every rank raises the same error there, before any state exists), and
        # collectives must come in the same order on every rank.
        keys = {id(group): key for group, _, key in active}
        plans = {}
        for group, params in zip(self.param_groups, work):
            if params:
                plans[id(group)] = self._plan(keys[id(group)], group, params, indices)
            elif self.process_group is not None and _scored(group):
                plans[id(group)] = self._empty_exchange(group)
        for group, params, _ in active:
            for device_plan in plans[id(group)]:
                plan = device_plan.plan
                for p, view, layout, index in zip(device_plan.params, device_plan.views, plan.layouts,
                                                  plan.tensor_indices):
                    if not self.state[p]:
                        self._init_state(p, group, index, view, layout)
        for group in self.param_groups:
            step_plans = plans.get(id(group))
            if isinstance(step_plans, BlockSumExchange):  # no piece here; the others still add up
                step_plans.reduce_(torch.zeros((0, 3), dtype=torch.float32, device=step_plans.device))
                continue
            hyper = _hyper(group) if step_plans else None
            for device_plan in step_plans or ():
                states = [self.state[p] for p in device_plan.params]
                reduce = device_plan.exchange.reduce_ if device_plan.exchange is not None else None
                functional.magma(device_plan.plan, _tensors(device_plan, states), hyper, grad_scale,
                                 found_inf, reduce)
                for position, group_of_shard, source in device_plan.score_broadcasts:
                    shards.broadcast_score(states[position]["magma_score"], group_of_shard, source)
        return loss

    def _check_options(self, group: dict) -> None:
        """Validate a group's hyperparameters when they differ from those last checked."""
        if self._checked_options.get(id(group)) != options_key(group):
            _check_group(group)
            self._checked_options[id(group)] = options_key(group)

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

    def _check_layouts(self, group: dict, params: list[torch.Tensor]) -> None:
        """Grads on their params' devices; state shaped like its parameter; block unchanged."""
        names = None
        for p in params:
            if p.grad.device != p.device:
                raise ValueError(f"grad on {p.grad.device} but param on {p.device}")
            state = self.state[p]
            if state:
                names = names or self._names()
                _check_state_fits(state, p, group, f"parameter {names[id(p)]}")

    def _plan(self, key: tuple, group: dict, params: list[torch.Tensor], new_indices: dict) -> list[_DevicePlan]:
        """What does not change from step to step for these parameters: cached under ``key``."""
        plans = self._plans.get(key)
        if plans is None:
            if len(self._plans) >= _CACHE_LIMIT:
                self._plans.clear()
            plans = [self._plan_device(group, device, members, new_indices)
                     for device, members in _by_device(params).items()]
            self._plans[key] = plans
        return plans

    def _plan_device(self, group: dict, device, params: list[torch.Tensor], new_indices: dict) -> _DevicePlan:
        names = self._names()
        positional = [self.state[p]["magma_tensor_index"] if self.state[p] else new_indices[id(p)] for p in params]
        views = [shards.view_of(p, index, group["block"], names.get(id(p), f"#{index}"))
                 for p, index in zip(params, positional)]
        layouts = [view.layout(group["block"]) for view in views]
        indices = [index if view.piece is None else view.piece.index for view, index in zip(views, positional)]
        masters = [("master_param" in self.state[p]) if self.state[p] else _wants_master(p, group) for p in params]
        if group["fused"] is None and device.type == "cuda" and not functional.extension_loaded():
            _warn_no_extension()
        exchange, broadcasts = None, []
        if _scored(group):
            broadcasts = [(i, *source) for i, (p, view) in enumerate(zip(params, views))
                          if (source := shards.empty_shard_score_source(p, view, group["block"])) is not None]
        plan = functional.plan_step(device, [view.local for view in views], masters, layouts, indices, group["fused"])
        sharded = any(view.piece is not None and view.piece.group is not None for view in views)
        if _scored(group) and (sharded or self.process_group is not None):
            # in the order of block_sums' rows, which the fused path groups by parameter kind
            descriptors = [
                (PieceDescriptor.of(views[i].piece or Piece(indices[i], 0, tuple(views[i].local.shape)),
                                    views[i].local.numel(), group["block"],
                                    name=names.get(id(params[i]), f"#{indices[i]}"), kind=views[i].kind),
                 views[i].piece.group if views[i].piece is not None else None)
                for i in plan.row_order
            ]
            exchange = BlockSumExchange.build(descriptors, device, groups=_groups(self.process_group))
        return _DevicePlan(params, views, plan, exchange, broadcasts)

    def _empty_exchange(self, group: dict) -> BlockSumExchange:
        """The exchange a rank with no piece of ``group`` joins (collective when first built)."""
        key = (id(group), "empty", id(self.process_group))
        if key not in self._plans:
            self._plans[key] = BlockSumExchange.build([], self._exchange_device(),
                                                      groups=_groups(self.process_group))
        return self._plans[key]

    def _exchange_device(self) -> torch.device:
        """Where an empty rank's block sums live: its CUDA device under NCCL, else the CPU."""
        import torch.distributed as dist

        if dist.get_backend(_groups(self.process_group)[0]) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _names(self) -> dict[int, str]:
        """Parameter names by id, from ``param_names`` where the groups have them, else positions."""
        names, position = {}, 0
        for group in self.param_groups:
            labels = group.get("param_names") or [None] * len(group["params"])
            for p, label in zip(group["params"], labels):
                names[id(p)] = repr(label) if label is not None else f"#{position}"
                position += 1
        return names


@dataclass
class _DevicePlan:
    """A group's parameters on one device, how the step sees them, and the plan of their step."""

    params: list[torch.Tensor]
    views: list[shards.ParamView]
    plan: functional.StepPlan
    exchange: BlockSumExchange | None  # completes the sums of blocks split across ranks
    # (position, process group, source rank) of replicated scores that a rank with an empty
    # shard cannot update itself: the shard group's first rank sends them after the step
    score_broadcasts: list[tuple[int, object, int]]

    def __post_init__(self):
        self.has_dtensors = any(view.kind == "dtensor" for view in self.views)


def _groups(process_group) -> list:
    """The ``process_group`` argument as a list of groups."""
    if process_group is None:
        return []
    if isinstance(process_group, (list, tuple)):
        return list(process_group)
    return [process_group]


def _check_process_groups(process_group) -> None:
    groups = _groups(process_group)
    if isinstance(process_group, (list, tuple)) and not groups:
        raise ValueError("process_group: an empty list; pass None for no group")
    for group in groups:
        if ProcessGroup is None or not isinstance(group, ProcessGroup):
            raise TypeError("process_group must be a torch.distributed.ProcessGroup, a list of them "
                            f"or None, got {type(group).__name__}")


def _scored(group: dict) -> bool:
    """Whether the group's step forms scores (and so needs whole-block sums)."""
    return group["magma"] and group["mask"] == "magma"


def _wants_master(p: torch.Tensor, group: dict) -> bool:
    return group["master_weights"] and p.dtype in LOW_PRECISION


def _plan_key(group: dict, params: list[torch.Tensor]) -> tuple:
    return (id(group), group["block"], group["fused"], _scored(group), tuple(map(id, params)))


def _tensors(device_plan: _DevicePlan, states: list[dict]) -> GroupTensors:
    """The lists of the step: the local pieces of parameters, grads and state."""
    layouts = device_plan.plan.layouts
    params = device_plan.params
    if not device_plan.has_dtensors:  # the common case, kept free of per-tensor calls
        return GroupTensors(
            params=params,
            grads=[p.grad for p in params],
            exp_avgs=[s["exp_avg"] for s in states],
            exp_avg_sqs=[s["exp_avg_sq"] for s in states],
            scores=[s["magma_score"] for s in states],
            steps=[s["step"] for s in states],
            master_params=[s.get("master_param") for s in states],
            layouts=layouts,
            tensor_indices=device_plan.plan.tensor_indices,
        )
    masters = [s.get("master_param") for s in states]
    return GroupTensors(
        params=shards.locals_of(params),
        grads=shards.locals_of([p.grad for p in params]),
        exp_avgs=shards.locals_of([s["exp_avg"] for s in states]),
        exp_avg_sqs=shards.locals_of([s["exp_avg_sq"] for s in states]),
        scores=[shards.local_score(s["magma_score"], layout) for s, layout in zip(states, layouts)],
        steps=[s["step"] for s in states],
        master_params=[None if m is None else shards.local(m) for m in masters],
        layouts=layouts,
        tensor_indices=device_plan.plan.tensor_indices,
    )


def _hyper(group: dict) -> Hyper:
    return Hyper(
        lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1], eps=group["eps"],
        weight_decay=group["weight_decay"], base=group["base"],
        mask=group["mask"] if group["magma"] else "none", keep_prob=group["keep_prob"],
        tau=group["tau"], score_ema=group["score_ema"], seed=group["seed"],
    )


def _split_names(items: list) -> tuple[list, list[str] | None]:
    """``(name, tensor)`` pairs -> (tensors, names), as torch.optim accepts them; else (items, None)."""
    named = [isinstance(item, tuple) for item in items]
    if not any(named):
        return items, None
    if not all(named) or any(len(item) != 2 or not isinstance(item[0], str) for item in items):
        raise TypeError("params must be all tensors or all (name, tensor) pairs")
    return [item[1] for item in items], [item[0] for item in items]


def _fresh_indices(positions: list[int], held: set[int], count: int) -> list[int]:
    """Each new parameter's position as its tensor index, unless that index is held; a held one
    gives way to the next index above every index in use and every position (``count``)."""
    fresh = max(max(held, default=-1) + 1, count)
    indices = []
    for index in positions:
        if index in held:
            index, fresh = fresh, fresh + 1
        held.add(index)
        indices.append(index)
    return indices


def _group_of(param_groups: list[dict], position: int) -> int:
    for i, group in enumerate(param_groups):
        if position < len(group["params"]):
            return i
        position -= len(group["params"])
    raise IndexError(position)


def _add_magma_state(state: dict, p: torch.Tensor, group: dict, tensor_index: int,
                     view: shards.ParamView | None = None, layout: BlockLayout | None = None) -> None:
    """The score (0.5 per block), tensor index and master copy a new parameter's state gets."""
    if view is None:
        view = shards.view_of(p, tensor_index, group["block"], f"#{tensor_index}")
        layout = view.layout(group["block"])
    state["magma_score"] = shards.new_score(p, view, layout, group["block"])
    state["magma_tensor_index"] = tensor_index
    if _wants_master(p, group) and "master_param" not in state:
        state["master_param"] = p.detach().to(torch.float32).clone()


def _loaded_state(saved: dict, p: torch.Tensor, group: dict, position: int) -> dict:
    """A saved entry as this optimizer keeps it (float32 on p's device), checked against p."""
    state = {}
    for key, value in saved.items():
        if key in FLOAT32_STATE:
            if not isinstance(value, torch.Tensor):
                value = torch.tensor(value) if key == "step" else value
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"loaded state of parameter {position}: {key} must be a tensor")
            value = value.to(dtype=torch.float32, device=p.device).clone()
        elif key == "magma_tensor_index":
            value = int(value)
        state[key] = value
    if "magma_score" in state and shards.has_local_block_scores(p, group["block"]):
        layout = shards.view_of(p, 0, group["block"], "").layout(group["block"])
        if state["magma_score"].numel() == layout_for(tuple(p.shape), group["block"]).num_blocks:
            state["magma_score"] = shards.local_block_scores(state["magma_score"], layout)
    for key in ("step", "exp_avg", "exp_avg_sq"):
        if key not in state:
            raise ValueError(f"loaded state of parameter {position} has no {key!r}")
    _check_state_fits(state, p, group, f"loaded state of parameter {position}")
    return state


def _check_state_fits(state: dict, p: torch.Tensor, group: dict, where: str) -> None:
    """State tensors shaped like the parameter, and a score with one entry per block."""
    for key in ("exp_avg", "exp_avg_sq", "master_param"):
        value = state.get(key)
        if value is not None and value.shape != p.shape:
            raise ValueError(
                f"{where}: {key} has shape {tuple(value.shape)} but the parameter has shape "
                f"{tuple(p.shape)}"
            )
    if state.get("step") is not None and state["step"].numel() != 1:
        raise ValueError(f"{where}: step must hold one number, got shape {tuple(state['step'].shape)}")
    score = state.get("magma_score")
    if score is not None:
        blocks = _score_blocks(p, group, score)
        if score.numel() != blocks:
            raise ValueError(
                f"{where}: block={group['block']!r} gives {blocks} blocks but magma_score has "
                f"{score.numel()}: block cannot change mid-run"
            )


def _score_blocks(p: torch.Tensor, group: dict, score: torch.Tensor) -> int:
    """Entries a parameter's score must have: its logical tensor's blocks, or the local piece's
    blocks where the score is a plain tensor of a piece."""
    if shards.is_dtensor(score) or (not shards.is_dtensor(p) and piece_of(p) is None):
        return layout_for(tuple(p.shape), group["block"]).num_blocks
    return shards.view_of(p, 0, group["block"], "").layout(group["block"]).num_blocks


def _raise_bad_grad(p: torch.Tensor, grad: torch.Tensor) -> None:
    if grad.layout is not torch.strided:
        raise TypeError(f"Magma does not support sparse gradients (grad layout {grad.layout})")
    if grad.dtype not in REAL_FLOATS:
        raise TypeError(f"Magma needs real floating-point gradients, got grad dtype {grad.dtype}")
    raise ValueError(f"grad shape {tuple(grad.shape)} does not match param shape {tuple(p.shape)}")


def _check_group(group: dict, where: str = "") -> None:
    try:
        check_group_options(group)
        if group["fused"] not in (None, True, False):
            raise TypeError(f"fused must be None, True or False, got {group['fused']!r}")
        for name in ("master_weights", "capturable"):
            if not isinstance(group[name], bool):
                raise TypeError(f"{name} must be a bool, got {type(group[name]).__name__}")
    except (TypeError, ValueError) as error:
        if not where:
            raise
        raise type(error)(f"{where}{error}") from None
    if group["fused"] and not functional.extension_loaded():
        raise RuntimeError(
            f"{where}fused=True needs magma_ext's CUDA extension, which is not loaded "
            f"({functional.extension_error()}); reinstall with a CUDA-enabled torch and nvcc, or use fused=None"
        )


def _check_fused_params(params) -> None:
    bad = [p for p in params if not functional.fusable(p)]
    if bad:
        raise RuntimeError(
            "fused=True requires every parameter to be a contiguous CUDA tensor of dtype float32, "
            f"bfloat16 or float16; got {bad[0].dtype} on {bad[0].device}"
            f"{'' if bad[0].is_contiguous() else ' (not contiguous)'}"
        )


def _refuse_unnumbered_zero(param_groups: list[dict]) -> None:
    """ZeroRedundancyOptimizer builds one Magma per rank from that rank's share of the
    parameters; numbered by position in that share, they would draw other masks than one
    process does.  Refuse that unless the parameters carry their indices (number_parameters)."""
    frame = inspect.currentframe()
    for _ in range(6):
        frame = frame.f_back if frame is not None else None
        owner = frame.f_locals.get("self") if frame is not None else None
        if type(owner).__name__ == "ZeroRedundancyOptimizer" and type(owner).__module__.startswith("torch.distributed"):
            break
    else:
        return
    if any(piece_of(p) is None for group in param_groups for p in group["params"]):
        raise ValueError(
            "ZeroRedundancyOptimizer(optimizer_class=Magma) gives each rank's Magma a subset of the "
            "parameters, which it would number from 0 and so draw different masks than one process; "
            "call magma_ext.number_parameters(params) on the same params before building it"
        )


def _warn_no_extension() -> None:
    global _warned_no_extension
    if not _warned_no_extension:
        _warned_no_extension = True
        warnings.warn(
            "Magma got CUDA parameters but runs its PyTorch path, about 4x slower than the fused "
            f"CUDA step: {functional.extension_error()}. Build the extension with "
            "`pip install --no-build-isolation .` under a CUDA build of torch with nvcc "
            "(see README.md, 'Building with CUDA'), or pass fused=False to silence this.",
            stacklevel=4,
        )


def _by_device(params):
    grouped = defaultdict(list)
    for p in params:
        grouped[p.device].append(p)
    return grouped
