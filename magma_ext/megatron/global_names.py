"""Megatron parameters by the names they have in the unsplit model: their tensor identity.

A parameter's masks are drawn with the tensor index of its *global name*
(:func:`magma_ext.name_index`, docs/ALGORITHM.md section 4): the name it has in the model built
with pipeline parallelism 1 and expert parallelism 1. Tensor and data parallelism change no
name; the other splits change local names, which this module maps back:

- **Pipeline stages and virtual stages.** Each model chunk numbers its transformer layers from
  0 (``decoder.layers.0`` ...); the layer's ``layer_number`` attribute (1-based) already counts
  the layers of the stages and virtual stages before it, so ``decoder.layers.{i}`` becomes
  ``decoder.layers.{layer_number - 1}``. Every chunk is walked.
- **Tied output layer.** With ``share_embeddings_and_output_weights`` and more than one stage,
  the last stage holds a copy of the word embedding as ``output_layer.weight`` (marked
  ``shared_embedding``); Megatron all-reduces the two copies' gradients over the embedding
  group, so both step alike. The copy takes the embedding's name, hence its masks and scores.
- **Experts.** A MoE layer (the module with ``local_expert_indices``) numbers its experts from
  0 on every expert-parallel rank: ``experts.local_experts.{i}.`` (``SequentialMLP``) and
  ``experts.linear_fc1.weight{i}`` (Transformer Engine's ``GroupedLinear``, one parameter per
  expert) become the global expert ``local_expert_indices[i]``. A parameter that holds all of a
  rank's experts at once (legacy ``GroupedMLP``'s ``experts.weight1``, or TE's grouped linear
  with ``moe_single_grouped_weight``) is refused: one tensor cannot be given several identities.

No megatron-core import: modules are read by their attributes (``layer_number``,
``local_expert_indices``, ``shared_embedding``), so CPU tests check the mapping on any module
tree, and on megatron-core's own modules where it is installed.
"""

from __future__ import annotations

import re

from ..names import canonical_name

__all__ = ["global_name", "global_parameter_names", "layer_indices", "expert_indices",
           "TIED_OUTPUT_NAME", "EMBEDDING_NAME"]

EMBEDDING_NAME = "embedding.word_embeddings.weight"
TIED_OUTPUT_NAME = "output_layer.weight"

_LAYER_MODULE = re.compile(r"(?:^|\.)(?:decoder|encoder)\.layers\.\d+$")
_PER_EXPERT = (re.compile(r"^experts\.local_experts\.(\d+)(\..+)$"),  # SequentialMLP
               re.compile(r"^experts\.(linear_fc[12]\.(?:weight|bias))(\d+)$"))  # TE GroupedLinear
_GROUPED = re.compile(r"^experts\.(?:weight[12]|linear_fc[12]\.(?:weight|bias))$")


def layer_indices(chunk) -> dict[str, int]:
    """``{module name: global 0-based layer index}`` of the transformer layers of one model
    chunk: modules named ``...decoder.layers.N`` (or ``encoder``) with an int ``layer_number``."""
    found = {}
    for name, module in chunk.named_modules():
        number = getattr(module, "layer_number", None)
        if _LAYER_MODULE.search(name) and isinstance(number, int) and not isinstance(number, bool):
            found[name] = number - 1
    return found


def expert_indices(chunk) -> dict[str, list[int]]:
    """``{module name: global expert numbers of its local experts}`` of the MoE layers of one
    model chunk (modules with a ``local_expert_indices`` list)."""
    return {name: list(module.local_expert_indices) for name, module in chunk.named_modules()
            if isinstance(getattr(module, "local_expert_indices", None), (list, tuple))}


def _owner(name: str, prefixes) -> str | None:
    """The longest of ``prefixes`` that is a module above ``name``."""
    best = None
    for prefix in prefixes:
        if name.startswith(prefix + ".") and (best is None or len(prefix) > len(best)):
            best = prefix
    return best


def global_name(name: str, layers: dict[str, int], experts: dict[str, list[int]],
                shared_embedding: bool = False) -> str:
    """The global name of the parameter named ``name`` in its chunk (wrappers' prefixes such as
    ``module.`` dropped, see :func:`magma_ext.names.canonical_name`).

    Args:
        name: the parameter's name in its model chunk (``chunk.named_parameters()``).
        layers: that chunk's :func:`layer_indices`.
        experts: that chunk's :func:`expert_indices`.
        shared_embedding: the parameter's ``shared_embedding`` attribute: with it, an
            ``output_layer.weight`` is the word embedding's copy.

    Raises:
        ValueError: an expert parameter whose expert cannot be told (one tensor of all the
            rank's experts, or a layout this module does not know), or a local expert number
            past the layer's ``local_expert_indices``.
    """
    moe = _owner(name, experts)
    if moe is not None:
        name = moe + "." + _global_expert(name[len(moe) + 1:], experts[moe], name)
    layer = _owner(name, layers)
    if layer is not None:
        head = layer[:layer.rfind(".") + 1]
        name = f"{head}{layers[layer]}{name[len(layer):]}"
    name = canonical_name(name)
    if shared_embedding and (name == TIED_OUTPUT_NAME or name.endswith("." + TIED_OUTPUT_NAME)):
        name = name[:len(name) - len(TIED_OUTPUT_NAME)] + EMBEDDING_NAME
    return name


def _global_expert(rest: str, indices: list[int], name: str) -> str:
    """``rest`` (a name below a MoE layer) with its local expert number made global."""
    if not rest.startswith("experts."):
        return rest  # the router, shared experts: not per expert
    if _GROUPED.match(rest):
        raise ValueError(
            f"{name}: one parameter holds all {len(indices)} experts of this rank (legacy GroupedMLP, or "
            "Transformer Engine's grouped linear with moe_single_grouped_weight/moe_single_grouped_bias), so "
            "its experts cannot be masked as the tensors they are; use SequentialMLP (moe_grouped_gemm=False) "
            "or TE's grouped linear with one parameter per expert (moe_single_grouped_weight=False)")
    for pattern in _PER_EXPERT:
        found = pattern.match(rest)
        if found is None:
            continue
        if pattern is _PER_EXPERT[0]:
            local, tail = int(found.group(1)), found.group(2)
            make = lambda number: f"experts.local_experts.{number}{tail}"  # noqa: E731
        else:
            stem, local = found.group(1), int(found.group(2))
            make = lambda number: f"experts.{stem}{number}"  # noqa: E731
        if local >= len(indices):
            raise ValueError(f"{name}: local expert {local}, but its MoE layer holds {len(indices)} experts")
        return make(indices[local])
    raise ValueError(f"{name}: an expert parameter of a layout magma_ext.megatron does not know (expected "
                     "experts.local_experts.<i>.* or experts.linear_fc<1|2>.weight<i>)")


def global_parameter_names(model_chunks) -> dict:
    """``{parameter: global name}`` over every chunk of ``model_chunks`` (a parameter met twice
    keeps its first name), in the chunks' order and each chunk's ``named_parameters()`` order.

    Raises ValueError where :func:`global_name` does, and when two parameters get one name
    (other than a tied output layer and its embedding, which live on different stages).
    """
    names, owner = {}, {}
    for chunk in model_chunks:
        layers, experts = layer_indices(chunk), expert_indices(chunk)
        for local, param in chunk.named_parameters():
            if param in names:
                continue
            name = global_name(local, layers, experts, bool(getattr(param, "shared_embedding", False)))
            if name in owner:
                raise ValueError(f"model_chunks: {owner[name]!r} and {local!r} both map to the global name "
                                 f"{name!r}; each parameter needs an identity of its own")
            owner[name] = local
            names[param] = name
    return names
