"""magma_ext.megatron.training, the route into Megatron-LM's own loop, on CPU: the --magma-*
arguments and their mapping to get_megatron_magma_optimizer's keywords, and the installed hooks
over stand-ins of megatron/training; against Megatron-LM's own megatron.training (shipped with
megatron-core 0.19) where it imports: its argument parser takes the arguments, and the call that
builds the optimizer passes only what get_megatron_magma_optimizer takes."""

from __future__ import annotations

import argparse
import sys
from types import ModuleType, SimpleNamespace

import pytest
import torch

from magma_ext.megatron.training import add_magma_arguments, install, magma_options


def parse(argv, seed=1234):
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=seed)
    return add_magma_arguments(parser).parse_args(argv)


def test_the_arguments_map_to_the_factorys_keywords():
    args = parse(["--magma", "--magma-keep-prob", "0.25", "--magma-block", "row", "--magma-tau", "1.5",
                  "--magma-score-ema", "0.8", "--magma-base", "laprop", "--magma-mask", "skip",
                  "--magma-sparse-param-gather", "--magma-moments", "bfloat16"])
    assert args.magma
    assert magma_options(args) == dict(keep_prob=0.25, block="row", seed=1234, tau=1.5, score_ema=0.8, base="laprop",
                                       mask="skip", sparse_param_gather=True, exp_avg_dtype=torch.bfloat16,
                                       exp_avg_sq_dtype=torch.bfloat16)
    defaults = magma_options(parse(["--magma-seed", "7", "--magma-block", "64"]))
    assert (defaults["seed"], defaults["block"], defaults["keep_prob"], defaults["mask"]) == (7, 64, 0.5, "magma")
    assert "masked" not in defaults and "exp_avg_dtype" not in defaults
    chosen = magma_options(parse(["--magma-masked", r"\.mlp\.linear_fc1\."]))["masked"]
    assert chosen("decoder.layers.3.mlp.linear_fc1.weight", None)
    assert not chosen("decoder.layers.3.self_attention.linear_qkv.weight", None)


@pytest.mark.parametrize("argv, message", [
    (["--magma-block", "0"], "--magma-block"),
    (["--magma-block", "rows"], "--magma-block"),
    (["--magma-masked", "("], "--magma-masked"),
    (["--magma-base", "sgd"], "--magma-base"),
])
def test_bad_arguments_are_refused_by_name(capsys, argv, message):
    with pytest.raises(SystemExit):
        parse(argv)
    assert message in capsys.readouterr().err


def _stand_ins(magma: bool):
    """Stand-ins of megatron.training.training and .arguments, and get_args()."""
    calls = []
    arguments = SimpleNamespace(parse_and_validate_args=lambda extra_args_provider=None, **kw: extra_args_provider)
    training = SimpleNamespace(get_megatron_optimizer=lambda config, chunks, *a, **kw: calls.append(("megatron", kw)))
    parsed = parse(["--magma"] if magma else [])
    return training, arguments, (lambda: parsed), calls


def test_install_adds_the_arguments_to_megatrons_and_builds_magma_only_when_asked(monkeypatch):
    training, arguments, get_args, calls = _stand_ins(magma=False)
    install(training, arguments, get_args)
    provider = arguments.parse_and_validate_args(
        extra_args_provider=lambda p: (p.add_argument("--modelopt"), p)[1], args_defaults={})
    parsed = provider(argparse.ArgumentParser()).parse_args(["--modelopt", "x", "--magma-keep-prob", "0.1"])
    assert parsed.modelopt == "x" and parsed.magma_keep_prob == 0.1  # Megatron-LM's own provider kept
    factory = training.get_megatron_optimizer
    install(training, arguments, get_args)
    assert training.get_megatron_optimizer is factory  # installed once
    training.get_megatron_optimizer("config", ["chunk"], config_overrides=None, use_gloo_process_groups=True,
                                    dump_param_to_param_group_map=None)
    assert calls == [("megatron", dict(config_overrides=None, use_gloo_process_groups=True,
                                       dump_param_to_param_group_map=None))]

    training, arguments, get_args, calls = _stand_ins(magma=True)
    fake = ModuleType("magma_ext.megatron.optimizer")
    fake.get_megatron_magma_optimizer = lambda config, chunks, *a, **kw: calls.append(("magma", kw))
    monkeypatch.setitem(sys.modules, "magma_ext.megatron.optimizer", fake)
    install(training, arguments, get_args)
    training.get_megatron_optimizer("config", ["chunk"], config_overrides={}, use_gloo_process_groups=False,
                                    dump_param_to_param_group_map="map")
    assert calls == [("magma", dict(config_overrides={}, use_gloo_process_groups=False,
                                    dump_param_to_param_group_map="map", **magma_options(get_args())))]


def test_a_megatron_lm_without_the_hooks_is_refused():
    with pytest.raises(RuntimeError, match="has no get_megatron_optimizer"):
        install(SimpleNamespace(), SimpleNamespace(parse_and_validate_args=print), lambda: None)


def _megatron_training():
    pytest.importorskip("megatron.core")
    try:
        import megatron.training.arguments as arguments
        import megatron.training.training as training
    except ImportError as error:  # megatron-core < 0.19 ships no megatron.training; it needs CUDA's deps
        pytest.skip(f"megatron.training does not import: {error}")
    return training, arguments


def test_megatron_lms_optimizer_call_passes_only_what_the_factory_takes():
    import ast
    import inspect
    import textwrap

    training, _ = _megatron_training()
    from magma_ext.megatron import get_megatron_magma_optimizer

    ours = inspect.signature(get_megatron_magma_optimizer).parameters
    tree = ast.parse(textwrap.dedent(inspect.getsource(training.setup_model_and_optimizer)))
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
             and getattr(node.func, "id", None) == "get_megatron_optimizer"]
    assert calls, "setup_model_and_optimizer no longer calls get_megatron_optimizer"
    for call in calls:
        assert len(call.args) <= 2 and {k.arg for k in call.keywords} <= set(ours), ast.unparse(call)


def test_megatron_lms_parser_takes_the_magma_arguments(monkeypatch):
    training, arguments = _megatron_training()
    monkeypatch.setattr(sys, "argv", ["pretrain_gpt.py", "--magma", "--magma-keep-prob", "0.3"])
    parsed = arguments.parse_args(extra_args_provider=add_magma_arguments)
    assert parsed.magma and magma_options(parsed)["keep_prob"] == 0.3 and parsed.optimizer == "adam"
    monkeypatch.setattr(training, "get_megatron_optimizer", training.get_megatron_optimizer)
    monkeypatch.setattr(arguments, "parse_and_validate_args", arguments.parse_and_validate_args)
    install()
    assert training.get_megatron_optimizer._magma_installed


def test_megatron_lms_default_arguments_pass_the_allow_lists(monkeypatch):
    """The OptimizerConfig and DDP config fields Megatron-LM fills from its own defaults (its dtype
    names mapped as its validate_args maps them) are all allowed."""
    import dataclasses

    _, arguments = _megatron_training()
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    from magma_ext.megatron.allow_list import DDP_CONFIG, OPTIMIZER_CONFIG, check_config

    monkeypatch.setattr(sys, "argv", ["pretrain_gpt.py", "--magma"])
    parsed = arguments.parse_args(extra_args_provider=add_magma_arguments)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    for cls, table in ((OptimizerConfig, OPTIMIZER_CONFIG), (DistributedDataParallelConfig, DDP_CONFIG)):
        fields = {f.name: getattr(parsed, f.name) for f in dataclasses.fields(cls) if hasattr(parsed, f.name)}
        fields = {k: dtypes.get(v, v) if isinstance(v, str) and k.endswith("dtype") else v for k, v in fields.items()}
        fields = {k: v for k, v in fields.items() if not (k.endswith("dtype") and v == "auto")}
        check_config(cls(**fields), table, cls.__name__, "Megatron-LM defaults")
