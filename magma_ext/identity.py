"""Which tensor index each parameter draws its masks with (docs/ALGORITHM.md sections 3 and 4).

A parameter's tensor index is frozen in its state (``magma_tensor_index``) at its first step.
Before that it is, in this order:

1. the index of its declared piece (:func:`magma_ext.declare_piece`,
   :func:`magma_ext.number_parameters`);
2. the index of its name (:func:`name_index`), where the optimizer was given names
   (``Magma(model.named_parameters())``): the same for the same logical tensor under any
   split of the model (pipeline stages, FSDP2, tensor parallelism) and after a resume on
   another layout;
3. its position in the optimizer's parameters, counted over ``param_groups`` in order.

Names and declared indices must be unique in one optimizer (checked when a group is added and
before the first step). A positional index is never given twice: a new parameter whose
position is held (by a declared piece, or by a parameter whose state has it after groups were
removed by hand) takes the next index above all in use.

``ZeroRedundancyOptimizer`` builds one optimizer per rank from that rank's share of the
parameters, which would number them from 0: :func:`check_zero_owner` refuses that unless the
parameters carry their indices.
"""

from __future__ import annotations

from .names import NAME_INDEX_BASE, canonical_name, name_index
from .pieces import piece_of

def named_indices(param_groups: list[dict]) -> dict[int, tuple[str, int]]:
    """``(name, index)`` of every named parameter of ``param_groups``, by ``id``."""
    found = {}
    for group in param_groups:
        for p, name in zip(group["params"], group.get("param_names") or ()):
            found[id(p)] = (name, name_index(name))
    return found


def check_names(group: dict) -> None:
    """A group's ``param_names`` (given as pairs or as the key itself, as torch.optim and
    torchtitan pass them) name each of its parameters with a str."""
    names = group["param_names"]
    if not isinstance(names, (list, tuple)) or len(names) != len(group["params"]):
        raise ValueError(f"param_names must be a list of one name per parameter ({len(group['params'])}), "
                         f"got {names!r}")
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"param_names must hold strings, got {type(name).__name__}")


def check_unique_names(param_groups: list[dict], new_group: dict) -> None:
    """Raise ValueError when a name of ``new_group`` is, once wrappers' additions are dropped,
    another parameter's name in it or in ``param_groups`` (or, unlikelier, draws its index)."""
    seen = {index: name for name, index in named_indices(param_groups).values()}
    for name in new_group.get("param_names") or ():
        index = name_index(name)
        if index in seen:
            raise ValueError(
                f"params: the names {seen[index]!r} and {name!r} give one tensor index "
                f"({canonical_name(name)!r} once wrappers' prefixes are dropped); each parameter "
                "needs a name of its own"
            )
        seen[index] = name


def held_indices(param_groups: list[dict], states) -> set[int]:
    """Indices that parameters' states or declared pieces already hold."""
    held = {state["magma_tensor_index"] for state in states if "magma_tensor_index" in state}
    held |= {piece.index for group in param_groups for piece in map(piece_of, group["params"]) if piece}
    return held


def new_tensor_indices(param_groups: list[dict], held: set[int], new_params) -> dict[int, int]:
    """Tensor indices, by ``id``, for parameters that have none yet and declare no piece: their
    names' where the groups have names, else their positions (``held``: indices in use).

    Raises ValueError when a name's index is held by another parameter (see
    :func:`check_unique_names`).
    """
    held = set(held)
    named = named_indices(param_groups)
    out = {}
    for p in new_params:
        if id(p) in named:
            name, index = named[id(p)]
            if index in held:
                raise ValueError(f"parameter {name!r}: its tensor index {index} is held by another "
                                 "parameter (a declared piece, or a state loaded from a checkpoint)")
            held.add(index)
            out[id(p)] = index
    unnamed = [p for p in new_params if id(p) not in named]
    if unnamed:
        members = [p for group in param_groups for p in group["params"]]
        position_of = {id(p): i for i, p in enumerate(members)}
        fresh = fresh_indices([position_of[id(p)] for p in unnamed], held, len(members))
        out.update({id(p): index for p, index in zip(unnamed, fresh)})
    return out


def fresh_indices(wanted: list[int], held: set[int], count: int) -> list[int]:
    """Each wanted index, unless it is held; a held one gives way to the next index above every
    index in use and above ``count`` (the number of positions)."""
    fresh = max(max((i for i in held if i < NAME_INDEX_BASE), default=-1) + 1, count)
    indices = []
    for index in wanted:
        if index in held:
            index, fresh = fresh, fresh + 1
        held.add(index)
        indices.append(index)
    return indices


def check_zero_owner(optimizer, magma_class) -> None:
    """Refuse a ``ZeroRedundancyOptimizer`` around ``magma_class`` whose parameters were not
    numbered. Run as a global ``torch.optim`` step pre-hook, so on each ZeRO's first step,
    before anything changes."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    if not isinstance(optimizer, ZeroRedundancyOptimizer) or getattr(optimizer, "_magma_numbering_checked", False):
        return
    inner = getattr(optimizer, "optim", None)
    if isinstance(inner, magma_class) and any(piece_of(p) is None for group in inner.param_groups
                                               for p in group["params"]):
        raise ValueError(
            "ZeroRedundancyOptimizer(optimizer_class=Magma) gives each rank's Magma a subset of the "
            "parameters, which it would number from 0 and so draw different masks than one process; "
            "call magma_ext.number_parameters(model.named_parameters()) before building it"
        )
    optimizer._magma_numbering_checked = True
