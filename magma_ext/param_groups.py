"""Parameter groups the way LLM trainers set them up, with Magma's masking where the paper puts it.

One function, :func:`split_parameters`, decides for every trainable parameter whether it is
masked, decayed, both or neither; :func:`param_groups` (for :class:`magma_ext.Magma`) and
:func:`decay_groups` (for ``torch.optim.AdamW`` and the like) are two views of that one split,
so a Magma run and its AdamW baseline always decay the same tensors.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

#: Attribute names that mark an ``nn.Linear`` as the model's output layer (see
#: :func:`split_parameters`): Hugging Face (``lm_head``, ``score``, ``classifier``), Meta's
#: Llama and Mistral (``output``), timm (``head``), GPT-NeoX (``embed_out``), ChatGLM
#: (``output_layer``).
HEAD_NAMES = frozenset({"lm_head", "output", "output_layer", "head", "classifier", "embed_out", "score"})

# The weights nn.MultiheadAttention holds directly (its out_proj is an nn.Linear).
_MULTIHEAD_ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")

MaskPredicate = Callable[[str, torch.Tensor], bool]


class ParameterSplit(NamedTuple):
    """The three disjoint lists of :func:`split_parameters`, each in model order."""

    masked: list[torch.Tensor]
    """Attention and MLP weights: masked by Magma and decayed."""
    unmasked_decayed: list[torch.Tensor]
    """The output layer and every other decayed weight that is not masked."""
    plain: list[torch.Tensor]
    """Embeddings, norms, biases and other 1-D parameters: neither masked nor decayed."""


def _check_model(model, function: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{function} takes the model (an nn.Module) and finds its layers itself; got "
                        f"{type(model).__name__} (pass model, not model.parameters())")


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def _is_embedding(module: nn.Module) -> bool:
    return isinstance(module, (nn.Embedding, nn.EmbeddingBag))


def _is_transposed_linear(module: nn.Module) -> bool:
    """A Hugging Face ``Conv1D`` (GPT-2, GPT-1, ...): a Linear whose weight is stored (in, out).

    Known by its class name and layout, so that transformers need not be imported: a 2-D
    ``weight`` whose second dimension is the module's ``nf`` (its number of outputs).
    """
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor)
            and weight.ndim == 2 and getattr(module, "nf", None) == weight.shape[1])


def _linear_outputs(module: nn.Module) -> int | None:
    """The number of outputs of a linear layer (``nn.Linear`` or a Hugging Face ``Conv1D``), else None."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if _is_transposed_linear(module):
        return module.nf
    return None


def _default_masked_ids(model: nn.Module) -> set[int]:
    """Ids of the attention/MLP weights under the default rule of :func:`split_parameters`."""
    modules = list(model.named_modules(remove_duplicate=False))  # every alias of a shared module
    embeddings = [m for _, m in modules if _is_embedding(m)]
    embedding_weights = {id(m.weight) for m in embeddings}
    vocab_sizes = {m.num_embeddings for m in embeddings}
    linears = [(name, m, outputs) for name, m in modules if (outputs := _linear_outputs(m)) is not None]

    output_weights = {id(m.weight) for name, m, _ in linears
                      if id(m.weight) in embedding_weights or name.rpartition(".")[2] in HEAD_NAMES}
    if not output_weights:
        vocab_projections = [m for _, m, outputs in linears if outputs in vocab_sizes]
        if vocab_projections:
            output_weights.add(id(vocab_projections[-1].weight))

    candidates = {id(m.weight) for _, m, _ in linears}
    for _, m in modules:
        if isinstance(m, nn.MultiheadAttention):
            candidates.update(id(w) for w in (getattr(m, n) for n in _MULTIHEAD_ATTENTION_WEIGHTS)
                              if w is not None)
    return candidates - output_weights


def split_parameters(model: nn.Module, masked: MaskPredicate | None = None) -> ParameterSplit:
    """Split ``model``'s trainable parameters into masked, unmasked-but-decayed and plain ones.

    The rule follows the paper (arXiv 2602.15322), which masks the attention and MLP weights
    only: masking every layer, the output layer included, trains worse (its Table A1).

    **Decay.** A parameter is *decayed* when it has two or more dimensions and belongs to no
    embedding (``nn.Embedding``, ``nn.EmbeddingBag``) and no norm (a module whose class name
    contains "norm", any case). Every other parameter (embeddings, norm weights, biases, other
    1-D tensors) is *plain*: neither decayed nor masked.

    **Mask (default rule).** A decayed parameter is *masked* when it is the ``weight`` of a
    Linear, or one of ``in_proj_weight``, ``q_proj_weight``, ``k_proj_weight``,
    ``v_proj_weight`` of an ``nn.MultiheadAttention``, and is not the weight of an output
    layer. A Linear is an ``nn.Linear`` (subclasses included) or a Hugging Face ``Conv1D``
    (GPT-2's attention and MLP layers: a module whose class is named ``Conv1D``, with a 2-D
    ``weight`` of shape (in, out) and ``nf`` outputs; its ``out_features`` below is ``nf``).
    A Linear is an output layer when

    1. its weight is the weight of an embedding (tied input/output embeddings; such a weight is
       plain anyway, as an embedding), or
    2. its attribute name (the last part of its name in ``model.named_modules()``, under any
       alias) is one of :data:`HEAD_NAMES`: ``lm_head``, ``output``, ``output_layer``, ``head``,
       ``classifier``, ``embed_out``, ``score``; or
    3. no Linear is an output layer by rules 1 and 2, and it is the *last* Linear in
       ``model.named_modules()`` order whose ``out_features`` equals the ``num_embeddings`` of
       an embedding of the model (a vocabulary projection). Only as a fallback and only the
       last one, because a hidden layer's width may equal the vocabulary size (a byte-level
       model of width 256, say); the head is normally registered after the hidden layers.

    Decayed parameters that are not masked (the output layer; weights of other layer types such
    as convolutions; 2-D parameters held directly by custom modules) are *unmasked_decayed*.

    **Override.** ``masked``, a predicate ``(name, param) -> bool``, replaces the default rule:
    it is called once for each decayed parameter, with its name from ``model.named_parameters()``,
    and the parameter is masked when it returns true. Decay does not change, and plain
    parameters stay plain (the predicate is not asked about them).

    Only parameters with ``requires_grad`` are listed, each once (a weight shared between
    modules, e.g. tied embeddings, appears once, under its first name), in the order of
    ``model.named_parameters()``.
    """
    _check_model(model, "split_parameters")
    if masked is not None and not callable(masked):
        raise TypeError(f"masked must be a callable (name, param) -> bool or None, "
                        f"got {type(masked).__name__}")
    undecayed_ids = set()
    for module in model.modules():
        if _is_embedding(module) or _is_norm(module):
            undecayed_ids.update(id(p) for p in module.parameters(recurse=False))
    default_ids = _default_masked_ids(model) if masked is None else None

    split = ParameterSplit([], [], [])
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or id(p) in undecayed_ids:
            split.plain.append(p)
            continue
        is_masked = id(p) in default_ids if masked is None else bool(masked(name, p))
        (split.masked if is_masked else split.unmasked_decayed).append(p)
    return split


def param_groups(model: nn.Module, weight_decay: float = 0.0, *, masked: MaskPredicate | None = None,
                 **options) -> list[dict]:
    """Parameter groups of ``model`` for :class:`magma_ext.Magma`, split by :func:`split_parameters`.

    Up to three groups, empty ones omitted:

    - the attention and MLP weights: masked, ``"weight_decay": weight_decay``;
    - the output layer and other unmasked weights: ``"weight_decay": weight_decay``,
      ``"magma": False``;
    - embeddings, norms, biases and other 1-D parameters: ``"weight_decay": 0.0``,
      ``"magma": False``.

    ``masked`` (a predicate ``(name, param) -> bool``) replaces the default choice of masked
    weights; see :func:`split_parameters`. ``options`` (e.g. ``lr``) go into every group.

    Each group lists ``(name, parameter)`` pairs, names as in ``model.named_parameters()``, so
    Magma keys each tensor's masks by its name: the same masks under any split of the model
    (docs/ALGORITHM.md section 4).

    Warns (``UserWarning``) when no parameter is masked, since Magma then runs as its base
    optimizer alone: the model has no layer the default rule knows as a Linear, or ``masked``
    chose none. Raises ``TypeError`` unless ``model`` is an ``nn.Module`` (not its parameters).
    """
    _check_model(model, "param_groups")
    split = split_parameters(model, masked)
    if not split.masked:
        chosen_by = ("masked= chose none of its decayed parameters" if masked is not None else
                     "the default rule found no trainable nn.Linear or Hugging Face Conv1D weight "
                     "other than the output layer's")
        warnings.warn(f"param_groups: no parameter of {type(model).__name__} is masked ({chosen_by}), "
                      f"so Magma will run as its base optimizer alone; pass masked=lambda name, param: "
                      f"... to choose the weights to mask", stacklevel=2)
    names = {}
    for name, p in model.named_parameters():
        names.setdefault(id(p), name)
    named = [[(names[id(p)], p) for p in params] for params in (split.masked, split.unmasked_decayed, split.plain)]
    groups = [
        {"params": named[0], "weight_decay": weight_decay, **options},
        {"params": named[1], "weight_decay": weight_decay, "magma": False, **options},
        {"params": named[2], "weight_decay": 0.0, "magma": False, **options},
    ]
    return [g for g in groups if g["params"]]


def decay_groups(model: nn.Module, weight_decay: float, **options) -> list[dict]:
    """AdamW-style parameter groups of ``model`` with the decay of :func:`param_groups`.

    ``[{"params": decayed, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]``
    where ``decayed`` is the masked plus the unmasked-but-decayed parameters of
    :func:`split_parameters` (so an AdamW baseline decays exactly what Magma decays) and
    ``plain`` the rest; empty groups are omitted. ``options`` go into both groups. Raises
    ``TypeError`` unless ``model`` is an ``nn.Module``.
    """
    _check_model(model, "decay_groups")
    split = split_parameters(model)
    order = {id(p): i for i, p in enumerate(model.parameters())}
    decayed = sorted(split.masked + split.unmasked_decayed, key=lambda p: order[id(p)])
    groups = [
        {"params": decayed, "weight_decay": weight_decay, **options},
        {"params": split.plain, "weight_decay": 0.0, **options},
    ]
    return [g for g in groups if g["params"]]
