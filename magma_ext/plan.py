"""Planning each parameter group's step: what stays the same while its parameters do.

Per group and device: how the step sees each parameter (:mod:`magma_ext.views`), its tensor
index (:mod:`magma_ext.identity`), the kernels' plan (:func:`magma_ext.functional.plan_step`),
the exchange that completes the sums of blocks split across ranks
(:class:`magma_ext.exchange.BlockSumExchange`) and the replicated scores that ranks with an
empty shard receive by broadcast (:mod:`magma_ext.dtensors`). Plans are cached under the
group's parameters and options.

Building a sharded group's exchange is collective: groups are planned in ``param_groups``
order on every rank, and a rank holding no piece of a scored group still joins the exchange
of every group in ``process_groups`` (docs/ALGORITHM.md section 7).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from . import dtensors, functional, identity
from .exchange import BlockSumExchange, PieceRecord
from .options import REAL_FLOATS, check_fused_params, check_grad
from .param_remainders import REMAINDER_KEY
from .state import check_rounded_state_fits, check_state_fits, master_form
from .types import GroupTensors, Hyper
from .views import ParamView, view_of

_CACHE_LIMIT = 64


@dataclass
class DevicePlan:
    """A group's parameters on one device, how the step sees them, and the plan of their step."""

    params: list[torch.Tensor]
    views: list[ParamView]
    plan: functional.StepPlan
    exchange: BlockSumExchange | None  # completes the sums of blocks split across ranks
    # (position, process group, source rank) of replicated scores that a rank with an empty
    # shard cannot update itself: the shard group's first rank sends them after the step
    score_broadcasts: list[tuple[int, object, int]]
    has_remainders: bool = False  # whether a master weight is kept as a remainder

    def __post_init__(self):
        self.has_dtensors = any(view.kind == "dtensor" for view in self.views)

    def tensors(self, states: list[dict]) -> GroupTensors:
        """The lists of the step: the local pieces of parameters, grads and state."""
        layouts, params = self.plan.layouts, self.params
        masters = [s.get("master_param") for s in states]
        remainders = [s.get(REMAINDER_KEY) for s in states] if self.has_remainders else None
        if not self.has_dtensors:  # the common case, kept free of per-tensor calls
            return GroupTensors(
                params=params, grads=[p.grad for p in params],
                exp_avgs=[s["exp_avg"] for s in states], exp_avg_sqs=[s["exp_avg_sq"] for s in states],
                scores=[s["magma_score"] for s in states], steps=[s["step"] for s in states],
                master_params=masters, layouts=layouts, tensor_indices=self.plan.tensor_indices,
                master_remainders=remainders,
            )
        return GroupTensors(
            params=dtensors.locals_of(params), grads=dtensors.local_grads(params),
            exp_avgs=dtensors.locals_of([s["exp_avg"] for s in states]),
            exp_avg_sqs=dtensors.locals_of([s["exp_avg_sq"] for s in states]),
            scores=[dtensors.local_score(s["magma_score"], layout) for s, layout in zip(states, layouts)],
            steps=[s["step"] for s in states],
            master_params=[None if m is None else dtensors.local(m) for m in masters],
            layouts=layouts, tensor_indices=self.plan.tensor_indices,
            master_remainders=None if remainders is None else [None if r is None else dtensors.local(r)
                                                                 for r in remainders],
        )

    def run(self, states: list[dict], hyper: Hyper, grad_scale, found_inf) -> None:
        """One step of these parameters, then the scores' broadcasts to empty shards."""
        reduce = self.exchange.reduce_ if self.exchange is not None else None
        functional.magma(self.plan, self.tensors(states), hyper, grad_scale, found_inf, reduce)
        for position, group, source in self.score_broadcasts:
            dtensors.broadcast_score(states[position]["magma_score"], group, source)


@dataclass
class GroupPlan:
    """A parameter group's step: one plan per device, or, on a rank that holds no piece of a
    scored group, the exchange it still joins."""

    devices: list[DevicePlan]
    empty_exchange: BlockSumExchange | None = None

    def states(self, params: list[torch.Tensor], states: list[dict]) -> list[list[dict]]:
        """Each device's parameters' state dicts, from ``states``, those of ``params`` (the
        group's parameters with gradients, in the order the plan was made from)."""
        if len(self.devices) == 1:  # one device: its parameters are ``params``, in order
            return [states]
        state_of = {id(p): s for p, s in zip(params, states)}
        return [[state_of[id(p)] for p in device.params] for device in self.devices]

    def new_views(self, states: list[list[dict]]) -> list[tuple[torch.Tensor, dict, ParamView, object]]:
        """(parameter, its empty state dict, view, blocks) of the parameters without state yet."""
        return [(p, s, view, layout) for device, device_states in zip(self.devices, states)
                for p, s, view, layout in zip(device.params, device_states, device.views, device.plan.layouts)
                if not s]

    def run(self, states: list[list[dict]], hyper: Hyper, grad_scale, found_inf) -> None:
        if self.empty_exchange is not None:  # no piece here; the others still add up
            self.empty_exchange.reduce_(torch.zeros((0, 3), dtype=torch.float32, device=self.empty_exchange.device))
        for device, device_states in zip(self.devices, states):
            device.run(device_states, hyper, grad_scale, found_inf)


class StepPlanner:
    """Plans the groups of one optimizer and keeps the plans while their parameters stay."""

    def __init__(self):
        self._plans: dict = {}

    def plan(self, param_groups: list[dict], state, process_groups: list) -> list[tuple[dict, GroupPlan, list]]:
        """COLLECTIVE for sharded groups on their first step: ``(group, plan, states)`` of every
        group with gradients (and of scored groups without, where ``process_groups`` are given:
        see ``Magma(process_group=)``), in order; ``states`` are the plan's parameters' state
        dicts, device by device (each parameter's state is looked up once a step: a lookup
        hashes a tensor in Python, host time that a step's GPU time includes).

        Checks every group's gradients and, for a group not planned before, its parameters'
        devices and state; raises before any state exists or changes.
        """
        work = [params_with_grad(group) for group in param_groups]
        work_states = [[state[p] for p in params] for params in work]
        keys = [_plan_key(group, params, process_groups) for group, params in zip(param_groups, work)]
        names = None
        for group, params, states, key in zip(param_groups, work, work_states, keys):
            if params and key not in self._plans:
                names = names or parameter_names(param_groups)
                _check_layouts(group, params, states, names)
        new = [p for params, states in zip(work, work_states) for p, s in zip(params, states) if not s]
        indices = {}
        if new:
            indices = identity.new_tensor_indices(param_groups, identity.held_indices(param_groups, state.values()), new)
        plans = []
        for group, params, states, key in zip(param_groups, work, work_states, keys):
            if params:
                plan = self._group_plan(key, group, params, states, indices, param_groups, process_groups)
                plans.append((group, plan, plan.states(params, states)))
            elif process_groups and _scored(group):
                plans.append((group, GroupPlan([], self._empty_exchange(group, process_groups)), []))
        return plans

    def exchanges(self) -> list[BlockSumExchange]:
        """The exchanges of the cached plans (for tests and benchmarks: their sizes and costs)."""
        found = []
        for plan in self._plans.values():
            if isinstance(plan, BlockSumExchange):
                found.append(plan)
            else:
                found += [device.exchange for device in plan.devices if device.exchange is not None]
        return found

    def _group_plan(self, key, group, params, states, new_indices, param_groups, process_groups) -> GroupPlan:
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= _CACHE_LIMIT:
                self._plans.clear()
            names = parameter_names(param_groups)
            state_of = {id(p): s for p, s in zip(params, states)}
            plan = GroupPlan([self._device_plan(group, device, members, state_of, new_indices, names, process_groups)
                              for device, members in _by_device(params).items()])
            self._plans[key] = plan
        return plan

    def _device_plan(self, group, device, params, state_of, new_indices, names, process_groups) -> DevicePlan:
        block = group["block"]
        states = [state_of[id(p)] for p in params]
        positional = [s["magma_tensor_index"] if s else new_indices[id(p)] for p, s in zip(params, states)]
        views = [view_of(p, index, block, names[id(p)]) for p, index in zip(params, positional)]
        for p, view in zip(params, views):
            check_rounded_state_fits(view, group, names[id(p)])
        layouts = [view.layout(block) for view in views]
        indices = [view.piece.index for view in views]
        forms = [master_form(p, s, group) for p, s in zip(params, states)]
        has_remainders = "remainder" in forms
        fused = False if has_remainders else group["fused"]  # the kernels do not take remainders
        if device.type == "cuda" and group["fused"] is None:
            if has_remainders:
                functional.warn_remainders_unfused()
            elif not functional.extension_loaded():
                functional.warn_no_extension()
        masters = [form == "float32" for form in forms]
        plan = functional.plan_step(device, [view.local for view in views], masters, layouts, indices, fused)
        exchange, broadcasts = None, []
        if _scored(group):
            broadcasts = [(i, *source) for i, (p, view) in enumerate(zip(params, views))
                          if (source := dtensors.empty_shard_score_source(p, view.piece, block)) is not None]
            if any(view.sharded for view in views) or process_groups:
                # in the order of block_sums' rows, which the fused path groups by parameter kind
                records = [PieceRecord(views[i].piece, block, names[id(params[i])], views[i].kind)
                           for i in plan.row_order]
                exchange = BlockSumExchange.build(records, device, groups=process_groups)
        return DevicePlan(params, views, plan, exchange, broadcasts, has_remainders)

    def _empty_exchange(self, group: dict, process_groups: list) -> BlockSumExchange:
        """The exchange a rank with no piece of ``group`` joins (collective when first built)."""
        key = (id(group), "empty", tuple(map(id, process_groups)))
        if key not in self._plans:
            self._plans[key] = BlockSumExchange.build([], _exchange_device(process_groups[0]),
                                                      groups=process_groups)
        return self._plans[key]


def params_with_grad(group: dict) -> list[torch.Tensor]:
    """The group's parameters that have a gradient, each gradient checked."""
    params = []
    for p in group["params"]:
        grad = p.grad
        if grad is None:
            continue
        if grad.layout is not torch.strided or grad.dtype not in REAL_FLOATS or grad.shape != p.shape:
            check_grad(p)
        params.append(p)
    if params and group["fused"]:
        check_fused_params(params)
    return params


def parameter_names(param_groups: list[dict]) -> dict[int, str]:
    """How errors name each parameter, by ``id``: its ``param_names`` entry, else its position."""
    names, position = {}, 0
    for group in param_groups:
        labels = group.get("param_names") or [None] * len(group["params"])
        for p, label in zip(group["params"], labels):
            names[id(p)] = repr(label) if label is not None else f"#{position}"
            position += 1
    return names


def _check_layouts(group: dict, params: list[torch.Tensor], states: list[dict], names: dict[int, str]) -> None:
    """Grads on their params' devices; state shaped like its parameter; block unchanged."""
    for p, s in zip(params, states):
        if p.grad.device != p.device:
            raise ValueError(f"grad on {p.grad.device} but param on {p.device}")
        if s:
            check_state_fits(s, p, group, f"parameter {names[id(p)]}")


def _scored(group: dict) -> bool:
    """Whether the group's step forms scores (and so needs whole-block sums)."""
    return group["magma"] and group["mask"] == "magma"


def _plan_key(group: dict, params: list[torch.Tensor], process_groups: list) -> tuple:
    return (id(group), group["block"], group["fused"], _scored(group), group["exp_avg_dtype"],
            group["exp_avg_sq_dtype"], group["master_weights"], group["store_param_remainders"],
            tuple(map(id, params)), tuple(map(id, process_groups)))


def _exchange_device(process_group) -> torch.device:
    """Where an empty rank's block sums live: its CUDA device under NCCL, else the CPU."""
    import torch.distributed as dist

    if dist.get_backend(process_group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _by_device(params):
    grouped = defaultdict(list)
    for p in params:
        grouped[p.device].append(p)
    return grouped
