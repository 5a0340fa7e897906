"""The private parts of megatron-core that magma_ext.megatron relies on, checked at construction.

The integration reaches past Megatron's public factory in a few places: it builds the parameter
groups with ``_get_param_groups_and_buffers``, wraps Magma as
``_get_megatron_optimizer_based_on_param_groups`` wraps Adam (a copy of its wrapping step), reads
the distributed optimizer's range maps and ``model_param_group_index_map``, overrides its
``_get/_set_main_param_and_optimizer_states``, and the sparse gather assumes that each rank owns
an equal contiguous split of each bucket. A release that moves any of these should fail when the
optimizer is built, naming itself, not mid-run:

- :func:`check_release` (once per process): the version (>= 0.19: earlier distributed
  optimizers accept Adam only) and the signatures of the functions and methods used;
- :func:`check_distributed_optimizer` (per distributed-optimizer part): the shard groups, range
  maps and group index map agree with each other, and (for the sparse gather) with the equal
  contiguous split of every bucket.

No megatron-core import at module level: the checks take the objects, so CPU tests run them on
stand-ins.
"""

from __future__ import annotations

import inspect

__all__ = ["MINIMUM_VERSION", "megatron_version", "check_release", "check_distributed_optimizer",
           "UnsupportedMegatron"]

MINIMUM_VERSION = (0, 19)

# what each private function or method is called with here, by megatron-core 0.19's names
EXPECTED_PARAMETERS = {
    "_get_param_groups_and_buffers": ("model_chunks", "model_chunk_offset", "config", "config_overrides",
                                      "filter_fn", "buffer_name"),
    "DistributedOptimizer.__init__": ("optimizer", "config", "grad_scaler", "init_state_fn", "model_chunks",
                                      "per_model_buffers", "data_parallel_group", "data_parallel_group_gloo",
                                      "data_parallel_group_idx", "distributed_optimizer_instance_id"),
    "Float16OptimizerWithFloat16Params.__init__": ("optimizer", "config", "grad_scaler", "init_state_fn"),
    "FP32Optimizer.__init__": ("optimizer", "config", "init_state_fn"),
    "DistributedOptimizer._get_main_param_and_optimizer_states": ("model_param",),
    "DistributedOptimizer._set_main_param_and_optimizer_states": ("model_param", "tensors"),
    "DistributedOptimizer._get_model_param_range_map": ("param",),
    "DistributedOptimizer.start_param_sync_for_bucket_group_subset": (),
    "ProcessGroupCollection.setup_process_groups_for_optimizer": ("pg_collection", "model_chunks",
                                                                  "use_gloo_process_groups"),
}
# _get_megatron_optimizer_based_on_param_groups: the wrapping copied in magma_ext.megatron.optimizer
# was read from these parameters; a new one may mean a new way of wrapping
COPIED_WRAPPING_PARAMETERS = ("config", "model_chunks", "param_groups", "per_model_buffers", "model_parallel_group",
                              "data_parallel_group", "data_parallel_group_gloo", "data_parallel_group_idx",
                              "intra_dist_opt_group", "distributed_optimizer_instance_id", "pg_collection",
                              "skip_megatron_wrapping")
# the process groups read from setup_process_groups_for_optimizer's answer
PROCESS_GROUP_KEYS = ("intra_dp_cp_group", "intra_dp_cp_group_gloo", "intra_expt_dp_group",
                      "intra_expt_dp_group_gloo", "mp_group", "expt_tp_pp_group", "intra_dist_opt_group")


class UnsupportedMegatron(RuntimeError):
    """A megatron-core whose private layout is not the one magma_ext.megatron was written for."""


def megatron_version() -> str:
    """The installed megatron-core's version string."""
    from megatron.core import package_info

    return package_info.__version__


def _as_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _parameters(function) -> list[str]:
    names = list(inspect.signature(function).parameters)
    return names[1:] if names and names[0] == "self" else names


def check_release(version: str, functions: dict, wrapping_function, factory, megatron_factory) -> None:
    """Raise :class:`UnsupportedMegatron`, naming ``version``, unless it is at least
    :data:`MINIMUM_VERSION`, each of ``functions`` (``{name in EXPECTED_PARAMETERS: callable, or
    None where the release lacks it}``) exists and takes the parameters it is called with, ``wrapping_function``
    (``_get_megatron_optimizer_based_on_param_groups``) has no parameter beyond
    :data:`COPIED_WRAPPING_PARAMETERS`, and ``factory`` (``get_megatron_magma_optimizer``) takes
    every parameter of ``megatron_factory`` (``get_megatron_optimizer``) by name and in order."""
    def refuse(what: str) -> None:
        raise UnsupportedMegatron(f"megatron-core {version}: {what}; magma_ext.megatron supports megatron-core 0.19 "
                                  "(tested with 0.19.2)")

    if _as_tuple(version) < MINIMUM_VERSION:
        refuse("its DistributedOptimizer accepts only Adam as its inner optimizer (megatron-core >= 0.19 takes any "
               "with an init_state_fn)")
    for name, function in functions.items():
        if function is None:
            refuse(f"it has no {name}")
        expected = EXPECTED_PARAMETERS[name]
        found = _parameters(function)
        missing = [p for p in expected if p not in found]
        if missing:
            refuse(f"{name} takes {found}, without {missing}")
    extra = [p for p in _parameters(wrapping_function) if p not in COPIED_WRAPPING_PARAMETERS]
    if extra:
        refuse(f"_get_megatron_optimizer_based_on_param_groups has new parameters {extra}: its wrapping of the "
               "inner optimizer, which get_megatron_magma_optimizer repeats, may have changed")
    ours, theirs = _parameters(factory), _parameters(megatron_factory)
    if ours[:len(theirs)] != theirs:
        refuse(f"get_megatron_optimizer takes {theirs}; get_megatron_magma_optimizer, which stands in for it, "
               f"takes {ours[:len(theirs)]} first")


def _fail(version: str, what: str):
    raise UnsupportedMegatron(f"megatron-core {version}: {what}; this is not the distributed optimizer "
                              "magma_ext.megatron was written for (megatron-core 0.19)")


def check_distributed_optimizer(wrapper, pairs: list, version: str, bucket_groups=None) -> None:
    """Check one built ``DistributedOptimizer`` part against what the integration reads from it.

    ``pairs``: ``(model parameter, the shard Magma holds for it)`` as read from its
    ``model_float16_groups``/``shard_fp32_from_float16_groups`` and
    ``model_fp32_groups``/``shard_fp32_groups``. Each must be the entry of
    ``model_param_group_index_map`` in the inner optimizer's groups, and its
    ``_get_model_param_range_map(p)["param"]`` range must have the shard's size.

    ``bucket_groups`` (for the sparse gather: the part's DDP bucket groups): every bucket's
    ``param_data`` must split into equal shards over the part's data-parallel group, and each
    parameter this rank owns must lie, by its ``gbuf_world_in_bucket`` range, in this rank's
    shard, at the place ``bucket.param_to_index`` gives it.

    Raises :class:`UnsupportedMegatron` naming ``version`` and the first disagreement.
    """
    groups = wrapper.optimizer.param_groups if wrapper.optimizer is not None else []
    index_map = getattr(wrapper, "model_param_group_index_map", None)
    if not isinstance(index_map, dict):
        _fail(version, "DistributedOptimizer has no model_param_group_index_map dict")
    for model_param, shard in pairs:
        place = index_map.get(model_param)
        if place is None:
            _fail(version, "a shard of the distributed optimizer's groups is missing from model_param_group_index_map")
        group, order = place
        if group >= len(groups) or order >= len(groups[group]["params"]) or groups[group]["params"][order] is not shard:
            _fail(version, f"model_param_group_index_map gives {place} for a shard that is not there in the inner "
                           "optimizer's param_groups")
        span = wrapper._get_model_param_range_map(model_param)["param"]
        if span.end - span.start != shard.numel():
            _fail(version, f"a shard of {shard.numel()} elements has the range map range [{span.start}, {span.end})")
    if len(pairs) != len(index_map):
        _fail(version, f"model_param_group_index_map holds {len(index_map)} parameters, the shard groups {len(pairs)}")
    if bucket_groups is not None:
        _check_bucket_ownership(wrapper, index_map, bucket_groups, version)


def _check_bucket_ownership(wrapper, owned: dict, bucket_groups, version: str) -> None:
    import torch.distributed as dist

    for bucket_group in bucket_groups:
        group = bucket_group.intra_distributed_optimizer_instance_group
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        for bucket in bucket_group.buckets:
            numel = bucket.param_data.numel()
            if numel % size:
                _fail(version, f"a bucket of {numel} elements does not split into {size} equal shards")
            shard = numel // size
            for param in bucket.params_list:
                if param not in owned:
                    continue
                ranges = wrapper._get_model_param_range_map(param)
                in_bucket, element = ranges["gbuf_world_in_bucket"], ranges["param"]
                if not rank * shard <= in_bucket.start <= in_bucket.end <= (rank + 1) * shard:
                    _fail(version, f"rank {rank} owns [{in_bucket.start}, {in_bucket.end}) of a bucket of {numel} "
                                   f"elements, outside its equal contiguous shard [{rank * shard}, {(rank + 1) * shard})")
                if bucket.param_to_index[param][0] + element.start != in_bucket.start:
                    _fail(version, "bucket.param_to_index and the range map place a parameter at different offsets")
