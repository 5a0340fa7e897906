"""``magma_ext.Magma``: the torch.optim.Optimizer.

The class is glue, as torch's ``Adam`` is: it validates its arguments (:mod:`magma_ext.options`),
creates state lazily (:mod:`magma_ext.state`), gathers each group's tensors per device
(:mod:`magma_ext.plan`) and runs :func:`magma_ext.functional.magma`, which picks the fused CUDA
ops or the PyTorch reference. See docs/ALGORITHM.md for the algorithm and its contract.
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer
from torch.optim.optimizer import register_optimizer_step_pre_hook

from . import identity, state as state_lib
from .options import check_group, check_params, options_key, process_groups
from .plan import StepPlanner, parameter_names
from .types import Hyper

_zero_hook = None


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
        store_param_remainders: with ``master_weights``, keep a bfloat16 parameter's master
            weight as the 16 bits its parameter lacks (``master_param_remainder``, int16): the
            same float32 master, in 2 bytes of state instead of 4 (as Transformer Engine's
            ``FusedAdam`` option of that name). The parameter is then the master rounded to
            nearest with ties away from zero (``.to(torch.bfloat16)`` rounds ties to even).
            float16 parameters keep a whole float32 master. The CUDA kernels do not take it:
            such groups run the PyTorch path (``fused=True`` is refused). Turning it on or off
            mid-run, or loading a checkpoint of the other form, converts the masters exactly at
            the next step (outside CUDA graph capture).
        exp_avg_dtype, exp_avg_sq_dtype: the dtype each moment is stored in, ``torch.float32``
            (the default) or ``torch.bfloat16`` (half the memory and fewer bytes per step; each
            new value is rounded stochastically from a Philox stream of its own, so a moment
            keeps its expectation; docs/ALGORITHM.md section 6). The step computes in float32
            either way. Fixed for a parameter once it has state: to change it, load a
            ``state_dict()`` into an optimizer built with the new dtypes.
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
        exp_avg_dtype: torch.dtype = torch.float32,
        exp_avg_sq_dtype: torch.dtype = torch.float32,
        store_param_remainders: bool = False,
        capturable: bool = False,
        process_group=None,
    ):
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, base=base, mask=mask,
            keep_prob=keep_prob, tau=tau, score_ema=score_ema, block=block, seed=seed,
            magma=True, fused=fused, master_weights=master_weights, capturable=capturable,
            exp_avg_dtype=exp_avg_dtype, exp_avg_sq_dtype=exp_avg_sq_dtype,
            store_param_remainders=store_param_remainders,
        )
        check_group(defaults)
        process_groups(process_group)
        self.process_group = process_group
        self._reset_caches()
        super().__init__(params, defaults)
        _watch_zero_owners()

    def _reset_caches(self) -> None:
        self._planner = StepPlanner()
        self._checked_options: dict[int, tuple] = {}

    def __setstate__(self, state: dict) -> None:
        """Restore a pickled or deep-copied optimizer; its caches are rebuilt on the next step.
        One pickled before the state's storage options existed stores as they did then: float32
        moments, whole float32 masters."""
        super().__setstate__(state)
        for options in (self.defaults, *self.param_groups):
            for key in state_lib.MOMENT_DTYPE_OPTIONS.values():
                options.setdefault(key, torch.float32)
            options.setdefault("store_param_remainders", False)
        self.process_group = None
        self._reset_caches()

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
        existing = getattr(self, "param_groups", [])
        check_params(params, {id(p) for group in existing for p in group["params"]})
        group = {**param_group, "params": params}
        if names is not None:
            group["param_names"] = names
        if "param_names" in group:
            identity.check_names(group)
            identity.check_unique_names(existing, group)
        where = f"parameter group {len(existing)}: " if existing else ""
        check_group({**self.defaults, **group}, where, params)
        super().add_param_group(group)

    @torch.no_grad()
    def init_state(self) -> None:
        """Create the state of every parameter that has none, as its first step would.

        Local (no communication), so a wrapper may call it while it builds a checkpoint
        template (Megatron-core's ``init_state_fn``). Pieces must be declared before.
        """
        new = [p for group in self.param_groups for p in group["params"] if not self.state[p]]
        if not new:
            return
        held = identity.held_indices(self.param_groups, self.state.values())
        indices = identity.new_tensor_indices(self.param_groups, held, new)
        names = parameter_names(self.param_groups)
        todo = [(p, group) for group in self.param_groups for p in group["params"]
                if id(p) in indices and not self.state[p]]
        for p, group in todo:  # every check before any state exists
            state_lib.check_new_state(p, group, indices[id(p)], names[id(p)])
        for p, group in todo:
            self.state[p] = state_lib.new_state_of(p, group, indices[id(p)], names[id(p)])

    def state_dict(self) -> dict:
        """torch.optim's state dict, Magma's state included (docs/ALGORITHM.md section 5).

        Under ``block=N`` a DTensor parameter's score is a per-rank tensor of the blocks its shard
        overlaps; the state dict holds the scores of all its blocks instead, as a ``Replicate()``
        DTensor, so that ``torch.distributed.checkpoint`` reshards it.  That takes one
        all-reduce per such parameter over its shard group: call it on every rank, as DCP does.
        """
        return state_lib.with_full_block_scores(super().state_dict(), self.param_groups)

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a Magma or ``torch.optim.AdamW`` checkpoint; a failed load changes nothing.

        Everything is checked before anything is installed.  Groups that lack Magma's keys (an
        AdamW checkpoint) keep this optimizer's values for them; state without a score or tensor
        index gets them as on a first step.  The moments' dtypes are this optimizer's (its
        groups keep their ``exp_avg_dtype`` and ``exp_avg_sq_dtype``, whatever the checkpoint's
        say): a float32 moment loaded into bfloat16 state is rounded to nearest, a bfloat16 one
        loaded into float32 state is exact.  So is ``store_param_remainders``: a master weight
        saved in the other form is converted, exactly, at the next step (when the model's weights,
        which a remainder pairs with, are loaded too).  Scores and whole master weights stay
        float32, remainders int16; all on the parameter's device (torch.optim would cast them to
        its dtype),
        and a ``step`` saved as a Python number becomes a float32 tensor; state without a
        ``step`` takes its group's ``"step"`` where the group has one (Megatron-core's distributed
        optimizer saves the step there when Transformer Engine or apex is installed).
        """
        groups, loaded = state_lib.checked_load(
            self.param_groups, state_dict,
            lambda params, held: identity.new_tensor_indices(self.param_groups, held, params))
        super().load_state_dict({"state": loaded, "param_groups": groups})
        self._reset_caches()
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for param_id, p in zip(saved_ids, params):  # torch.optim cast these to p's dtype
            if param_id in loaded:
                self.state[p].update(loaded[param_id])

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
        # Check and plan every group before touching anything, so that an error changes nothing.
        changed = [group for group in self.param_groups
                   if self._checked_options.get(id(group)) != options_key(group)]
        for group in changed:
            check_group(group)
        plans = self._planner.plan(self.param_groups, self.state, process_groups(self.process_group))
        if changed:  # after a load too: _reset_caches() forgot every group
            state_lib.settle_masters(changed, self.state)
            self._checked_options.update((id(group), options_key(group)) for group in changed)
        for group, plan, states in plans:
            for p, state, view, layout in plan.new_views(states):
                state.update(state_lib.new_state(p, group, view, layout))
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        for group, plan, states in plans:
            plan.run(states, _hyper(group), grad_scale, found_inf)
        return loss


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


def _watch_zero_owners() -> None:
    """Install, once per process, the step pre-hook that refuses a ZeroRedundancyOptimizer whose
    Magma would number a subset of the parameters from 0 (:func:`identity.check_zero_owner`)."""
    global _zero_hook
    if _zero_hook is None:
        _zero_hook = register_optimizer_step_pre_hook(
            lambda optimizer, args, kwargs: identity.check_zero_owner(optimizer, Magma))
