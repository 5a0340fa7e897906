"""A parameter's optimizer state (docs/ALGORITHM.md section 5): made, checked, saved and loaded.

``optimizer.state[p]`` holds ``step``, ``exp_avg``, ``exp_avg_sq`` (float32, shaped like ``p``),
``magma_score`` (float32, one entry per block), ``magma_tensor_index`` and, with master
weights for a bfloat16/float16 parameter, ``master_param`` (float32).
"""

from __future__ import annotations

import torch

from . import dtensors
from .layout import BlockLayout, layout_for
from .options import check_group
from .pieces import is_dtensor, piece_of
from .views import ParamView, view_of

LOW_PRECISION = (torch.bfloat16, torch.float16)
FLOAT32_STATE = ("step", "exp_avg", "exp_avg_sq", "magma_score", "master_param")
# Keys of torch.optim.AdamW's groups that would change its update; Magma has no such option.
UNSUPPORTED_TORCH_OPTIONS = ("amsgrad", "maximize")


def wants_master(p: torch.Tensor, group: dict) -> bool:
    """Whether a new state of ``p`` in ``group`` gets a float32 master copy."""
    return group["master_weights"] and p.dtype in LOW_PRECISION


def new_state(p: torch.Tensor, group: dict, view: ParamView, layout: BlockLayout) -> dict:
    """The state a parameter gets on its first step (or from ``Magma.init_state``)."""
    state = {
        "step": torch.zeros((), dtype=torch.float32, device=view.local.device),
        "exp_avg": torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format),
        "exp_avg_sq": torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format),
    }
    add_magma_state(state, p, group, view.piece.index, layout)
    return state


def new_state_of(p: torch.Tensor, group: dict, position_index: int) -> dict:
    """:func:`new_state` of a parameter whose tensor index is ``position_index`` unless it
    declares a piece."""
    view = view_of(p, position_index, group["block"], f"#{position_index}")
    return new_state(p, group, view, view.layout(group["block"]))


def add_magma_state(state: dict, p: torch.Tensor, group: dict, tensor_index: int,
                    layout: BlockLayout | None = None) -> None:
    """The score (0.5 per block), tensor index and master copy a parameter's state gets when
    it has none (a first step, or a ``torch.optim.AdamW`` checkpoint)."""
    if layout is None:
        layout = view_of(p, tensor_index, group["block"], f"#{tensor_index}").layout(group["block"])
    state["magma_score"] = dtensors.new_score(p, layout, group["block"])
    state["magma_tensor_index"] = tensor_index
    if wants_master(p, group) and "master_param" not in state:
        state["master_param"] = p.detach().to(torch.float32).clone()


def with_full_block_scores(packed: dict, param_groups: list[dict]) -> dict:
    """COLLECTIVE where a DTensor is sharded under ``block=N``: ``torch.optim``'s packed state
    dict with such a parameter's per-rank score replaced by all its blocks' scores (a
    ``Replicate()`` DTensor that ``torch.distributed.checkpoint`` reshards)."""
    position = 0
    for group in param_groups:
        for p in group["params"]:
            state = packed["state"].get(position)
            if state is not None and "magma_score" in state and dtensors.has_local_block_scores(p, group["block"]):
                piece = view_of(p, 0, group["block"], "").piece
                full = dtensors.full_block_scores(p, piece, group["block"], state["magma_score"])
                packed["state"][position] = {**state, "magma_score": full}  # the live dict stays
            position += 1
    return packed


def checked_load(param_groups: list[dict], state_dict: dict, new_indices) -> tuple[list[dict], dict]:
    """The groups and states of a Magma or ``torch.optim.AdamW`` checkpoint, checked against
    this optimizer's ``param_groups`` before anything is installed.

    ``new_indices(params, held)`` gives tensor indices, by ``id``, to the parameters whose saved
    state has none (an AdamW checkpoint) and that declare no piece (``held``: the indices in
    use). Returns the merged groups and the states by saved id.
    """
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(param_groups):
        raise ValueError(
            f"loaded state dict has {len(saved_groups)} parameter groups, this optimizer has "
            f"{len(param_groups)}"
        )
    groups = []
    for i, (current, saved) in enumerate(zip(param_groups, saved_groups)):
        if len(saved["params"]) != len(current["params"]):
            raise ValueError(
                f"loaded parameter group {i} has {len(saved['params'])} parameters, this "
                f"optimizer's has {len(current['params'])}"
            )
        for key in UNSUPPORTED_TORCH_OPTIONS:
            if saved.get(key):
                raise ValueError(f"loaded parameter group {i} sets {key}=True, which Magma does not support")
        group = {**{k: v for k, v in current.items() if k != "params"}, **saved}
        check_group(group, where=f"loaded parameter group {i}: ")
        groups.append(group)
    params = [p for group in param_groups for p in group["params"]]
    group_of = [i for i, group in enumerate(param_groups) for _ in group["params"]]
    saved_ids = [i for group in saved_groups for i in group["params"]]
    loaded = {}
    for position, (param_id, p) in enumerate(zip(saved_ids, params)):
        if param_id in state_dict["state"]:
            group = groups[group_of[position]]
            saved = state_dict["state"][param_id]
            if "step" not in saved and group.get("step") is not None:
                saved = {**saved, "step": group["step"]}
            loaded[param_id] = _loaded_state(saved, p, group, position)
    missing = [(param_id, position) for position, param_id in enumerate(saved_ids)
               if param_id in loaded and "magma_tensor_index" not in loaded[param_id]]
    held = {s["magma_tensor_index"] for s in loaded.values() if "magma_tensor_index" in s}
    held |= {piece.index for piece in map(piece_of, params) if piece is not None}
    fresh = new_indices([params[position] for _, position in missing if piece_of(params[position]) is None], held)
    for param_id, position in missing:
        piece = piece_of(params[position])
        index = piece.index if piece is not None else fresh[id(params[position])]
        add_magma_state(loaded[param_id], params[position], groups[group_of[position]], index)
    return groups, loaded


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
    if "magma_score" in state and dtensors.has_local_block_scores(p, group["block"]):
        layout = view_of(p, 0, group["block"], "").layout(group["block"])
        if state["magma_score"].numel() == layout_for(tuple(p.shape), group["block"]).num_blocks:
            state["magma_score"] = dtensors.local_block_scores(state["magma_score"], layout)
    for key in ("step", "exp_avg", "exp_avg_sq"):
        if key not in state:
            raise ValueError(f"loaded state of parameter {position} has no {key!r}")
    check_state_fits(state, p, group, f"loaded state of parameter {position}")
    return state


def check_state_fits(state: dict, p: torch.Tensor, group: dict, where: str) -> None:
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
    if is_dtensor(score) or (not is_dtensor(p) and piece_of(p) is None):
        return layout_for(tuple(p.shape), group["block"]).num_blocks
    return view_of(p, 0, group["block"], "").layout(group["block"]).num_blocks
