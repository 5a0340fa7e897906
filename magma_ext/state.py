"""A parameter's optimizer state (docs/ALGORITHM.md section 5): made, checked, saved and loaded.

``optimizer.state[p]`` holds ``step``, ``exp_avg``, ``exp_avg_sq`` (shaped like ``p``, of the
group's ``exp_avg_dtype`` and ``exp_avg_sq_dtype``: float32 or bfloat16), ``magma_score``
(float32, one entry per block), ``magma_tensor_index`` and, with master weights for a
bfloat16/float16 parameter, ``master_param`` (float32) or, for a bfloat16 parameter in a group
with ``store_param_remainders``, its low 16 bits ``master_param_remainder``
(:mod:`magma_ext.param_remainders`).
"""

from __future__ import annotations

import torch

from . import dtensors, param_remainders
from .layout import BlockLayout, layout_for
from .options import check_group
from .param_remainders import REMAINDER_DTYPE, REMAINDER_KEY
from .pieces import is_dtensor, piece_of
from .rounding import MAX_ROUNDED_NUMEL
from .views import ParamView, view_of

LOW_PRECISION = (torch.bfloat16, torch.float16)
FLOAT32_STATE = ("step", "magma_score", "master_param")
# The moments and the group option that gives each its dtype.
MOMENT_DTYPE_OPTIONS = {"exp_avg": "exp_avg_dtype", "exp_avg_sq": "exp_avg_sq_dtype"}
# The group options that say how state is stored, not what a step computes: a loaded group keeps
# this optimizer's (loading converts the checkpoint's state to them).
STORAGE_OPTIONS = (*MOMENT_DTYPE_OPTIONS.values(), "store_param_remainders")
# Keys of torch.optim.AdamW's groups that would change its update; Magma has no such option.
UNSUPPORTED_TORCH_OPTIONS = ("amsgrad", "maximize")


def wants_master(p: torch.Tensor, group: dict) -> bool:
    """Whether a new state of ``p`` in ``group`` gets a master weight (whole or as a remainder)."""
    return group["master_weights"] and p.dtype in LOW_PRECISION


def wants_remainder(p: torch.Tensor, group: dict) -> bool:
    """Whether ``p``'s master weight in ``group`` is kept as a 16-bit remainder."""
    return group["master_weights"] and group["store_param_remainders"] and p.dtype == torch.bfloat16


def master_form(p: torch.Tensor, state: dict, group: dict) -> str | None:
    """How ``p``'s master weight is kept once :func:`settle_masters` has run: ``"remainder"``,
    ``"float32"`` or None (no master). A parameter that has a master keeps one; its group's
    ``store_param_remainders`` says in which form."""
    if not (_has_master(state) if state else wants_master(p, group)):
        return None
    return "remainder" if wants_remainder(p, group) else "float32"


def _has_master(state: dict) -> bool:
    return "master_param" in state or REMAINDER_KEY in state


def settle_masters(param_groups: list[dict], states) -> None:
    """Give every master weight the form its group asks for (:func:`master_form`), exactly: a
    float32 master (from a checkpoint, or before ``store_param_remainders`` was turned on) is
    split into the bfloat16 parameter and its remainder, a remainder joined with the parameter
    into a float32 master. Done at a step, after ``load_state_dict()`` and whenever a group's
    options change, so that the parameter the remainder pairs with is the one the step updates
    (a model loaded after its optimizer included)."""
    work = []
    for group in param_groups:
        for p in group["params"]:
            state = states.get(p)
            if not state:
                continue
            form = master_form(p, state, group)
            if form is not None and (form == "remainder") != (REMAINDER_KEY in state):
                work.append((p, state, form))
    if work and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "Magma: master weights must change form (store_param_remainders, or a loaded checkpoint "
            "of the other form) at this step, which is being captured in a CUDA graph; take one step "
            "outside the capture first"
        )
    for p, state, form in work:
        param = dtensors.local(p)
        if form == "remainder":
            high, low = param_remainders.split(dtensors.local(state.pop("master_param")))
            param.copy_(high)
            state[REMAINDER_KEY] = dtensors.like(p, low)
        else:
            master = param_remainders.join(param, dtensors.local(state.pop(REMAINDER_KEY)))
            state["master_param"] = dtensors.like(p, master)


def new_state(p: torch.Tensor, group: dict, view: ParamView, layout: BlockLayout, name: str = "") -> dict:
    """The state a parameter gets on its first step (or from ``Magma.init_state``)."""
    check_rounded_state_fits(view, group, name or f"#{view.piece.index}")
    state = {"step": torch.zeros((), dtype=torch.float32, device=view.local.device)}
    for key, option in MOMENT_DTYPE_OPTIONS.items():
        state[key] = torch.zeros_like(p, dtype=group[option], memory_format=torch.contiguous_format)
    add_magma_state(state, p, group, view.piece.index, layout)
    return state


def rounded_state(group: dict) -> bool:
    """Whether a group stores a moment in bfloat16 (rounded stochastically)."""
    return any(group[option] != torch.float32 for option in MOMENT_DTYPE_OPTIONS.values())


def check_rounded_state_fits(view: ParamView, group: dict, name: str) -> None:
    """bfloat16 state keys each element's rounding by its index in the logical tensor
    (docs/ALGORITHM.md section 6): refuse pieces whose elements are not one contiguous range of
    the logical tensor's flattening, and tensors too large for the rounding stream's counter."""
    if not rounded_state(group):
        return
    piece = view.piece
    if not view.in_logical_order:
        what = (f"a piece of column slice {piece.split[0]} of {piece.parts} (a row-parallel weight)"
                if piece.parts > 1 else "a DTensor sharded along a dimension other than 0")
        raise ValueError(
            f"parameter {name} is {what}: its elements are not a contiguous range of its logical "
            "tensor, whose element indices key the stochastic rounding of bfloat16 state; give it "
            "a parameter group with exp_avg_dtype=exp_avg_sq_dtype=torch.float32"
        )
    if piece.logical_numel > MAX_ROUNDED_NUMEL:
        raise ValueError(f"parameter {name} has {piece.logical_numel} elements; bfloat16 state "
                         f"(exp_avg_dtype/exp_avg_sq_dtype) takes tensors of at most 2**36")


def check_new_state(p: torch.Tensor, group: dict, position_index: int, name: str) -> None:
    """Raise what :func:`new_state_of` would raise, creating nothing."""
    check_rounded_state_fits(view_of(p, position_index, group["block"], name), group, name)


def new_state_of(p: torch.Tensor, group: dict, position_index: int, name: str) -> dict:
    """:func:`new_state` of a parameter whose tensor index is ``position_index`` unless it
    declares a piece."""
    view = view_of(p, position_index, group["block"], name)
    return new_state(p, group, view, view.layout(group["block"]), name)


def add_magma_state(state: dict, p: torch.Tensor, group: dict, tensor_index: int,
                    layout: BlockLayout | None = None) -> None:
    """The score (0.5 per block), tensor index and master copy a parameter's state gets when
    it has none (a first step, or a ``torch.optim.AdamW`` checkpoint)."""
    if layout is None:
        layout = view_of(p, tensor_index, group["block"], f"#{tensor_index}").layout(group["block"])
    state["magma_score"] = dtensors.new_score(p, layout, group["block"])
    state["magma_tensor_index"] = tensor_index
    if _has_master(state):
        return
    if wants_remainder(p, group):
        state[REMAINDER_KEY] = torch.zeros_like(p, dtype=REMAINDER_DTYPE)  # p is its master exactly
    elif wants_master(p, group):
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
        # the state's storage is this optimizer's: loading converts the checkpoint's to it
        storage = {option: current[option] for option in STORAGE_OPTIONS}
        group = {**{k: v for k, v in current.items() if k != "params"}, **saved, **storage}
        check_group(group, where=f"loaded parameter group {i}: ", params=current["params"])
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
    """A saved entry as this optimizer keeps it on p's device (moments in the group's dtypes,
    rounded to nearest where that is narrower; the rest float32), checked against p."""
    state = {}
    for key, value in saved.items():
        if key in FLOAT32_STATE or key in MOMENT_DTYPE_OPTIONS:
            if not isinstance(value, torch.Tensor):
                value = torch.tensor(value) if key == "step" else value
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"loaded state of parameter {position}: {key} must be a tensor")
            dtype = group[MOMENT_DTYPE_OPTIONS[key]] if key in MOMENT_DTYPE_OPTIONS else torch.float32
            value = value.to(dtype=dtype, device=p.device).clone()
        elif key == "magma_tensor_index":
            value = int(value)
        elif key == REMAINDER_KEY:
            if not isinstance(value, torch.Tensor) or value.dtype != REMAINDER_DTYPE or p.dtype != torch.bfloat16:
                raise ValueError(f"loaded state of parameter {position}: {REMAINDER_KEY} must be an int16 "
                                 f"tensor beside a bfloat16 parameter, got "
                                 f"{getattr(value, 'dtype', type(value).__name__)} beside {p.dtype}")
            value = value.to(device=p.device).clone()
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
    """State tensors shaped like the parameter, moments of the group's dtypes, and a score with
    one entry per block."""
    for key in ("exp_avg", "exp_avg_sq", "master_param", REMAINDER_KEY):
        value = state.get(key)
        if value is not None and value.shape != p.shape:
            raise ValueError(
                f"{where}: {key} has shape {tuple(value.shape)} but the parameter has shape "
                f"{tuple(p.shape)}"
            )
    for key, option in MOMENT_DTYPE_OPTIONS.items():
        value = state.get(key)
        if value is not None and value.dtype != group[option]:
            raise ValueError(
                f"{where}: {key} is {value.dtype} but its group's {option} is {group[option]}: a "
                "moment's dtype cannot change mid-run; load a state_dict() into an optimizer "
                f"built with {option}={group[option]} to convert it"
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
