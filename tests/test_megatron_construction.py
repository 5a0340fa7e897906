"""What get_megatron_magma_optimizer checks before it builds anything, on CPU: the allow-lists of
Megatron's config fields (magma_ext.megatron.allow_list), the private functions and layouts it
relies on (magma_ext.megatron.internals), and that it takes get_megatron_optimizer's
parameters. Stand-ins always; megatron-core's own configs and factory where it is installed."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from magma_ext.megatron.allow_list import ANY, DDP_CONFIG, OPTIMIZER_CONFIG, check_config
from magma_ext.megatron.internals import (
    EXPECTED_PARAMETERS, UnsupportedMegatron, check_distributed_optimizer, check_release)


@dataclasses.dataclass
class StandInConfig:
    lr: float = 1e-3  # ANY
    optimizer: str = "adam"  # fixed
    main_grads_dtype: torch.dtype = torch.float32  # fixed, compared by name
    new_flag: bool = False  # not reviewed
    new_list: tuple = dataclasses.field(default_factory=tuple)  # not reviewed, factory default


TABLE = {"lr": ANY, "optimizer": ("adam",), "main_grads_dtype": ("torch.float32",)}

REFUSED = [  # (fields set, message)
    (dict(optimizer="sgd"), r"config\.optimizer='sgd' is not supported .*megatron-core 9\.9.*must be 'adam'"),
    (dict(main_grads_dtype=torch.bfloat16), r"main_grads_dtype=torch\.bfloat16 .* must be 'torch\.float32'"),
    (dict(new_flag=True), r"config\.new_flag=True: a setting of megatron-core 9\.9 .* not reviewed .* default False"),
    (dict(new_list=(1,)), r"config\.new_list=\(1,\).* default \(\)"),
    (dict(new_flag=1), r"new_flag=1"),  # 1 is not the default False: types count
]


@pytest.mark.parametrize("fields, message", REFUSED, ids=[next(iter(f)) + "=" + repr(next(iter(f.values())))
                                                          for f, _ in REFUSED])
def test_fields_outside_the_allow_list_are_refused_by_name(fields, message):
    with pytest.raises(ValueError, match=message):
        check_config(StandInConfig(**fields), TABLE, "config", "9.9")


def test_allowed_values_and_unreviewed_defaults_pass():
    check_config(StandInConfig(lr=0.5), TABLE, "config", "9.9")
    with pytest.raises(TypeError, match="dataclass instance"):
        check_config({"lr": 1.0}, TABLE, "config", "9.9")


def test_megatron_configs_are_reviewed_field_by_field():
    pytest.importorskip("megatron.core")
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    for cls, table in ((OptimizerConfig, OPTIMIZER_CONFIG), (DistributedDataParallelConfig, DDP_CONFIG)):
        unreviewed = [f.name for f in dataclasses.fields(cls) if f.name not in table]
        assert not unreviewed, f"{cls.__name__} fields missing from the allow-list: {unreviewed}"
    check_config(OptimizerConfig(lr=1e-3, bf16=True, params_dtype=torch.bfloat16, use_distributed_optimizer=True,
                                 clip_grad=1.0, weight_decay=0.1, adam_beta2=0.95), OPTIMIZER_CONFIG, "config", "x")
    check_config(DistributedDataParallelConfig(use_distributed_optimizer=True, overlap_grad_reduce=True,
                                               overlap_param_gather=True), DDP_CONFIG, "ddp_config", "x")
    for fields in (dict(decoupled_weight_decay=False), dict(optimizer="sgd"), dict(optimizer_cpu_offload=True)):
        with pytest.raises(ValueError, match=next(iter(fields))):
            check_config(OptimizerConfig(lr=1e-3, **fields), OPTIMIZER_CONFIG, "config", "x")
    if any(f.name == "optimizer_cuda_graph" for f in dataclasses.fields(OptimizerConfig)):
        with pytest.raises(ValueError, match="optimizer_cuda_graph=True"):
            check_config(OptimizerConfig(lr=1e-3, optimizer_cuda_graph=True), OPTIMIZER_CONFIG, "config", "x")
    with pytest.raises(ValueError, match="use_megatron_fsdp=True"):
        check_config(DistributedDataParallelConfig(use_megatron_fsdp=True), DDP_CONFIG, "ddp_config", "x")


# ---------------------------------------------------------------------------- private functions


def _signature_of(parameters):
    """A function taking ``parameters`` by name."""
    namespace = {}
    exec(f"def f(self, {', '.join(parameters)}): pass" if parameters else "def f(self): pass", namespace)
    return namespace["f"]


def _release(**changes):
    functions = {name: _signature_of(params) for name, params in EXPECTED_PARAMETERS.items()}
    arguments = dict(version="0.19.2", functions=functions, wrapping_function=_signature_of(["config", "model_chunks"]),
                     factory=_signature_of(["config", "model_chunks", "masked"]),
                     megatron_factory=_signature_of(["config", "model_chunks"]))
    for key, value in changes.items():
        if key in EXPECTED_PARAMETERS:
            arguments["functions"] = {**functions, key: value}
        else:
            arguments[key] = value
    return arguments


@pytest.mark.parametrize("changes, message", [
    (dict(version="0.18.2"), r"megatron-core 0\.18\.2: its DistributedOptimizer accepts only Adam"),
    ({"_get_param_groups_and_buffers": _signature_of(["model_chunks", "config"])},
     r"_get_param_groups_and_buffers takes .* without \['model_chunk_offset'"),
    ({"DistributedOptimizer._get_model_param_range_map": None}, r"it has no DistributedOptimizer\._get_model_param_range_map"),
    (dict(wrapping_function=_signature_of(["config", "model_chunks", "use_fused_kernels"])),
     r"new parameters \['use_fused_kernels'\]"),
    (dict(megatron_factory=_signature_of(["config", "model_chunks", "extra"])), r"get_megatron_optimizer takes"),
])
def test_a_release_that_moved_what_the_wrapper_reads_is_refused_naming_it(changes, message):
    check_release(**_release())
    with pytest.raises(UnsupportedMegatron, match=message):
        check_release(**_release(**changes))


def test_the_factory_takes_get_megatron_optimizers_parameters_in_order():
    pytest.importorskip("megatron.core")
    import inspect

    from megatron.core.optimizer import get_megatron_optimizer

    from magma_ext.megatron import get_megatron_magma_optimizer

    ours = inspect.signature(get_megatron_magma_optimizer).parameters
    theirs = inspect.signature(get_megatron_optimizer).parameters
    assert list(ours)[:len(theirs)] == list(theirs)
    for name, parameter in theirs.items():
        assert ours[name].default == parameter.default, name
    assert "dump_param_to_param_group_map" in ours


# ---------------------------------------------------------------------------- a built distributed optimizer


class Range(SimpleNamespace):
    pass


class StandInDistOpt:
    """The parts of Megatron's DistributedOptimizer the checks read: one bucket of 12 elements
    over 2 ranks (this one rank 0, owning [0, 6)), holding a parameter of 4 elements at bucket
    offset 0 and one of 8 at offset 4, of which this rank owns elements [0, 2)."""

    def __init__(self):
        self.a, self.b = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(8))
        self.shard_a, self.shard_b = torch.zeros(4), torch.zeros(2)
        self.optimizer = SimpleNamespace(param_groups=[{"params": [self.shard_a, self.shard_b]}])
        self.model_param_group_index_map = {self.a: (0, 0), self.b: (0, 1)}
        self.ranges = {self.a: dict(param=Range(start=0, end=4), gbuf_world_in_bucket=Range(start=0, end=4)),
                       self.b: dict(param=Range(start=0, end=2), gbuf_world_in_bucket=Range(start=4, end=6))}
        bucket = SimpleNamespace(param_data=torch.zeros(12), params_list=[self.a, self.b],
                                 param_to_index={self.a: (0, 4), self.b: (4, 12)})
        self.bucket_groups = [SimpleNamespace(buckets=[bucket], intra_distributed_optimizer_instance_group=None)]

    def _get_model_param_range_map(self, param):
        return self.ranges[param]

    def pairs(self):
        return [(self.a, self.shard_a), (self.b, self.shard_b)]


def _check(wrapper, monkeypatch, rank=0):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: rank)
    check_distributed_optimizer(wrapper, wrapper.pairs(), "0.19.2", wrapper.bucket_groups)


def test_a_distributed_optimizer_laid_out_as_expected_passes(monkeypatch):
    _check(StandInDistOpt(), monkeypatch)


@pytest.mark.parametrize("break_it, message", [
    (lambda w: w.model_param_group_index_map.update({w.b: (0, 0)}), r"gives \(0, 0\) for a shard that is not there"),
    (lambda w: w.ranges[w.b].update(param=Range(start=0, end=3)), "a shard of 2 elements has the range map range"),
    (lambda w: w.ranges[w.b].update(gbuf_world_in_bucket=Range(start=6, end=8)), "outside its equal contiguous shard"),
    (lambda w: w.bucket_groups[0].buckets[0].param_to_index.update({w.b: (5, 13)}), "param_to_index and the range map"),
    (lambda w: setattr(w.bucket_groups[0].buckets[0], "param_data", torch.zeros(13)), "does not split into 2"),
    (lambda w: delattr(w, "model_param_group_index_map"), "no model_param_group_index_map"),
])
def test_a_distributed_optimizer_laid_out_otherwise_is_refused_naming_the_release(monkeypatch, break_it, message):
    wrapper = StandInDistOpt()
    break_it(wrapper)
    with pytest.raises(UnsupportedMegatron, match=f"megatron-core 0.19.2: .*{message}"):
        _check(wrapper, monkeypatch)


@pytest.mark.parametrize("options, error, message", [
    (dict(lr=0.1), TypeError, "lr comes from config"),
    (dict(process_group=None), TypeError, "process_group comes from config"),
    (dict(master_weights=True), TypeError, "master_weights: Megatron keeps float32 main parameters"),
    (dict(store_param_remainders=True), TypeError, "store_param_remainders: Megatron keeps float32 main"),
])
def test_magma_keywords_the_wrapper_does_not_take_are_refused(options, error, message):
    pytest.importorskip("megatron.core")
    from megatron.core.optimizer import OptimizerConfig

    from magma_ext.megatron.optimizer import _check_arguments

    _check_arguments(OptimizerConfig(lr=1e-3), ["chunk"], dict(keep_prob=0.5, exp_avg_dtype=torch.bfloat16))
    with pytest.raises(error, match=message):
        _check_arguments(OptimizerConfig(lr=1e-3), ["chunk"], options)
    with pytest.raises(TypeError, match="model_chunks must be a non-empty list"):
        _check_arguments(OptimizerConfig(lr=1e-3), [], {})


def _tp_param(partition_dim):
    p = torch.nn.Parameter(torch.zeros(2, 3))
    p.tensor_model_parallel, p.partition_dim = True, partition_dim
    return p


@pytest.mark.parametrize("tp_size, options, refused", [
    (2, dict(exp_avg_dtype=torch.bfloat16), "exp_avg_dtype=torch.bfloat16: decoder.linear_proj.weight"),
    (2, dict(exp_avg_sq_dtype=torch.bfloat16), "exp_avg_sq_dtype=torch.bfloat16: decoder.linear_proj.weight"),
    (2, dict(block=64), "block=64: decoder.layers.0.linear_proj.weight"),
    (2, dict(exp_avg_dtype=torch.float32, block="row"), None),
    (1, dict(exp_avg_dtype=torch.bfloat16, exp_avg_sq_dtype=torch.bfloat16, block=64), None),
])
def test_what_row_parallel_slices_cannot_take_is_refused_at_construction(tp_size, options, refused):
    pytest.importorskip("megatron.core")
    from magma_ext.megatron.optimizer import MAGMA_GROUP, _refuse_row_parallel_slices

    column, row, masked_row = _tp_param(0), _tp_param(1), _tp_param(1)
    names = {column: "decoder.linear_qkv.weight", row: "decoder.linear_proj.weight",
             masked_row: "decoder.layers.0.linear_proj.weight"}
    # an unmasked row-parallel weight first: bfloat16 moments refuse it, N-element blocks do not
    groups = [{"params": [column, row]}, {"params": [masked_row], "optimizer": MAGMA_GROUP}]
    if refused is None:
        _refuse_row_parallel_slices(groups, names, tp_size, options)
    else:
        with pytest.raises(ValueError, match=refused.replace(".", r"\.") + ".*row-parallel"):
            _refuse_row_parallel_slices(groups, names, tp_size, options)
