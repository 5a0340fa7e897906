"""Carrying Magma's block scores through Megatron-core checkpoints.

Megatron's wrappers checkpoint an inner optimizer's state as tensors shaped like each parameter
(``Float16OptimizerWithFloat16Params``, ``FP32Optimizer``) or like each distributed-optimizer
shard (``dp_reshardable``), and the ``fully_reshardable`` format keeps only ``exp_avg`` and
``exp_avg_sq``. A score has one value per *block*, so it fits none of them. It travels instead as
one plain entry of the optimizer's state dict, ``"magma_scores"``: for every logical tensor
index, its block option and the scores of all its blocks, gathered from the ranks that hold
them (every piece of a block holds the same score). Megatron saves plain entries once (its
"common" state) and gives them back to every rank on load, so the scores resume on any layout:
tensors are keyed by the index of their global name (``magma_ext.megatron.global_names``), the
same under every tensor-, data-, pipeline- and expert-parallel split.

Checkpoints written before tensor identities came from names key the scores by the parameter's
position in the first model chunk's ``named_parameters()`` (indices below ``2**32``).
:func:`keyed_by_names` maps them to names where those positions can still be computed (pipeline
parallelism 1, one model chunk, expert parallelism 1) and refuses them elsewhere.

No megatron-core import: tests run these on CPU, the mixins over stand-ins of Megatron's wrappers.
"""

from __future__ import annotations

import warnings

import torch

from ..layout import piece_blocks
from ..names import NAME_INDEX_BASE
from ..pieces import piece_of
from ..views import view_of

SCORES_KEY = "magma_scores"
MAGMA_STATE_KEYS = ("magma_score", "magma_tensor_index")

__all__ = ["SCORES_KEY", "MAGMA_STATE_KEYS", "POSITIONS_UNKNOWN", "gather_block_scores", "install_block_scores",
           "keyed_by_names",
           "without_magma_state", "record_steps_in_groups", "CarriesMagmaScores", "ShardStateFilter"]


def _scored_pieces(magma):
    """(parameter, its group, tensor index, first block, blocks of the logical tensor) of every
    parameter whose state holds a score (none for ``magma=None``, a wrapper without parameters)."""
    for group in magma.param_groups if magma is not None else ():
        for p in group["params"]:
            state = magma.state.get(p)
            if not state or "magma_score" not in state:
                continue
            index = state["magma_tensor_index"]
            layout = view_of(p, index, group["block"], f"#{index}").layout(group["block"])
            piece = piece_of(p)
            whole = layout.logical_numel if piece is None else piece.slice_numel
            yield p, group, index, layout.first_block, piece_blocks(0, whole, layout.block_size)[1]


def gather_block_scores(magma, group=None) -> dict[int, dict]:
    """COLLECTIVE over ``group`` (default: the world): ``{tensor index: {"block": option,
    "scores": float32 CPU tensor of all its blocks}}``, the same on every rank."""
    import torch.distributed as dist

    local = []
    for p, param_group, index, first, total in _scored_pieces(magma):
        local.append((index, param_group["block"], total, first, magma.state[p]["magma_score"].detach().cpu()))
    gathered = [local]
    if dist.is_available() and dist.is_initialized():
        gathered = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, local, group=group)
    merged: dict[int, dict] = {}
    for entries in gathered:
        for index, block, total, first, scores in entries:
            entry = merged.setdefault(index, {"block": block, "scores": torch.full((total,), float("nan"))})
            if entry["block"] != block or entry["scores"].numel() != total:
                raise ValueError(f"tensor index {index}: ranks disagree on its blocks ({entry['block']!r}, "
                                 f"{entry['scores'].numel()} vs {block!r}, {total})")
            entry["scores"][first:first + scores.numel()] = scores
    for index, entry in merged.items():
        if torch.isnan(entry["scores"]).any():
            raise ValueError(f"tensor index {index}: some of its blocks are held by no rank")
    return merged


def install_block_scores(magma, saved: dict[int, dict]) -> list[int]:
    """Copy the saved scores of each local piece's blocks into its state; returns the tensor
    indices the checkpoint had no scores for (they keep the score they have: 0.5 when new).

    Raises ValueError, changing nothing, when a tensor's block option or block count differs
    from the checkpoint's.
    """
    plan, missing = [], []
    for p, group, index, first, total in _scored_pieces(magma):
        entry = saved.get(index)
        if entry is None:
            missing.append(index)
            continue
        if entry["block"] != group["block"] or entry["scores"].numel() != total:
            raise ValueError(
                f"tensor index {index}: the checkpoint's scores are for block={entry['block']!r} "
                f"({entry['scores'].numel()} blocks), this optimizer has block={group['block']!r} "
                f"({total} blocks): block cannot change mid-run"
            )
        score = magma.state[p]["magma_score"]
        plan.append((score, entry["scores"][first:first + score.numel()]))
    for score, values in plan:
        score.copy_(values)
    return sorted(set(missing))


POSITIONS_UNKNOWN = (
    "the checkpoint's Magma scores are keyed by parameter positions (written by magma_ext.megatron before tensor "
    "identities came from parameter names), which are known only with pipeline parallelism 1, one model chunk and "
    "expert parallelism 1: resume it once in such a layout and save again")


def keyed_by_names(saved: dict[int, dict], positions: list[int] | None, refusal: str | None = None) -> dict[int, dict]:
    """``saved`` scores (a ``"magma_scores"`` entry) with every positional key (below ``2**32``:
    a checkpoint written before names keyed the tensors) replaced by the name index of the
    parameter at that position: ``positions[k]`` is the name index of position ``k``.

    Without ``positions``, positional keys are refused with ``refusal`` (a ValueError) where one
    is given (the optimizer numbers its tensors by name, but cannot tell positions), and kept as
    they are otherwise (an optimizer that numbers its tensors so itself).

    Raises ValueError, changing nothing, as said, and for a position past ``positions``' end.
    """
    legacy = sorted(index for index in saved if index < NAME_INDEX_BASE)
    if not legacy or (positions is None and refusal is None):
        return saved
    if positions is None:
        raise ValueError(refusal)
    if legacy[-1] >= len(positions):
        raise ValueError(f"the checkpoint's Magma scores name parameter position {legacy[-1]}, but the model "
                         f"has {len(positions)} parameters: a checkpoint of another model?")
    mapped = {index: entry for index, entry in saved.items() if index >= NAME_INDEX_BASE}
    for position in legacy:
        mapped[positions[position]] = saved[position]
    return mapped


def without_magma_state(optimizer_state: dict) -> dict:
    """A torch.optim state dict (``{"state": ..., "param_groups": ...}``) whose per-parameter
    entries lack Magma's score and tensor index (new dicts: the optimizer's own are untouched)."""
    state = {key: {k: v for k, v in entry.items() if k not in MAGMA_STATE_KEYS}
             if isinstance(entry, dict) else entry
             for key, entry in optimizer_state["state"].items()}
    return {**optimizer_state, "state": state}


def record_steps_in_groups(magma) -> None:
    """Each group's step count as ``group["step"]``: where Megatron's distributed optimizer reads
    it when Transformer Engine or apex is installed (Magma's load takes it back from there)."""
    for group in magma.param_groups:
        steps = {int(magma.state[p]["step"].item()) for p in group["params"] if "step" in magma.state.get(p, {})}
        if len(steps) == 1:
            group["step"] = steps.pop()


class CarriesMagmaScores:
    """Mixin before one of Megatron's optimizer wrappers (``self.optimizer`` a Magma): Magma's
    scores are kept out of the per-tensor state the wrapper checkpoints and carried in the
    ``"magma_scores"`` entry instead; each group's step is written to ``group["step"]`` too.

    ``state_dict()``/``sharded_state_dict()`` gather the scores from every rank: call them on
    every rank, as Megatron's checkpointing does. Positionally keyed scores (older checkpoints)
    are mapped with ``legacy_tensor_indices`` (the name index of each position of the first
    model chunk's parameters) or refused with ``legacy_refusal`` (see :func:`keyed_by_names`).
    """

    legacy_tensor_indices: list[int] | None = None
    legacy_refusal: str | None = None

    def state_dict(self, *args, **kwargs):
        if self.optimizer is not None:  # None: a part without parameters on this rank (a stub)
            record_steps_in_groups(self.optimizer)
        packed = super().state_dict(*args, **kwargs)
        inner = packed.get("optimizer", packed)
        if isinstance(inner, dict) and isinstance(inner.get("state"), dict):
            stripped = without_magma_state(inner)
            packed = {**packed, "optimizer": stripped} if "optimizer" in packed else stripped
        packed[SCORES_KEY] = gather_block_scores(self.optimizer)
        return packed

    def sharded_state_dict(self, model_sharded_state_dict, is_loading: bool = False, **kwargs):
        if is_loading and self.optimizer is not None:
            self.optimizer.init_state()
        return super().sharded_state_dict(model_sharded_state_dict, is_loading=is_loading, **kwargs)

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        scores = keyed_by_names(state_dict.pop(SCORES_KEY, None) or {}, self.legacy_tensor_indices,
                                self.legacy_refusal)
        super().load_state_dict(state_dict)
        if self.optimizer is None:
            return
        missing = install_block_scores(self.optimizer, scores)
        if missing:
            warnings.warn(
                f"the checkpoint holds no Magma scores for {len(missing)} tensors (tensor indices "
                f"{missing[:8]}{'...' if len(missing) > 8 else ''}): a checkpoint of another optimizer? "
                "They start from a score of 0.5", stacklevel=2)


class ShardStateFilter:
    """Mixin before Megatron's ``DistributedOptimizer``: its per-shard checkpoint state holds the
    main parameter, ``exp_avg`` and ``exp_avg_sq`` (and the ``step``, which it handles apart),
    never the score, which travels in ``"magma_scores"``."""

    def _get_main_param_and_optimizer_states(self, model_param):
        tensors = super()._get_main_param_and_optimizer_states(model_param)
        tensors.pop("magma_score", None)
        return tensors

    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        # Megatron copies every tensor of the live state from ``tensors``. The score comes from
        # "magma_scores" and the step from the param groups (load_state_dict set it), so they
        # are hidden: dp_reshardable's ``tensors["step"]`` is the step of the optimizer that
        # built the loading template, not the checkpoint's.
        group_index, group_order = self.model_param_group_index_map[model_param]
        state = self.optimizer.state[self.optimizer.param_groups[group_index]["params"][group_order]]
        hidden = {k: state.pop(k) for k in list(state)
                  if isinstance(state[k], torch.Tensor) and (k not in tensors or k == "step")}
        try:
            super()._set_main_param_and_optimizer_states(model_param, tensors)
        finally:
            state.update(hidden)
