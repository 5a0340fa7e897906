"""Magma in Megatron-LM's own training loop (``pretrain_gpt.py`` and the other ``pretrain_*.py``).

Megatron-LM's ``--optimizer`` takes a fixed list, and ``megatron/training/training.py`` builds the
optimizer by calling the name ``get_megatron_optimizer`` it imported from
``megatron.core.optimizer``, with ``config_overrides``, ``use_gloo_process_groups`` and
``dump_param_to_param_group_map`` as keywords. This module is the supported route in:

- :func:`add_magma_arguments` adds ``--magma`` and the ``--magma-*`` options to a parser (an
  ``extra_args_provider``);
- :func:`magma_options` turns the parsed arguments into
  :func:`~magma_ext.megatron.get_megatron_magma_optimizer`'s keywords;
- :func:`install` makes Megatron-LM's ``parse_and_validate_args`` add those arguments and points
  ``megatron.training.training.get_megatron_optimizer`` at a factory that builds Magma when
  ``--magma`` was given (Megatron's own optimizer otherwise);
- ``python -m magma_ext.megatron.training PRETRAIN_SCRIPT [ARGS...]`` (:func:`main`) installs it
  and runs the script as its ``__main__``, with the script's folder first on ``sys.path`` (as
  ``python PRETRAIN_SCRIPT`` would). Under torchrun::

      torchrun --nproc-per-node 8 -m magma_ext.megatron.training /path/to/Megatron-LM/pretrain_gpt.py \\
          <Megatron-LM's arguments> --magma --magma-keep-prob 0.5 --magma-block tensor

Written against Megatron-LM's ``megatron/training`` of megatron-core 0.19.2 (shipped in its
wheel; ``pretrain_gpt.py`` read at Megatron-LM d98e8a64dd): ``parse_and_validate_args`` in
``megatron.training.arguments``, ``get_megatron_optimizer`` looked up in
``megatron.training.training``'s namespace when ``setup_model_and_optimizer`` runs, and
``get_args()`` for the parsed arguments.
"""

from __future__ import annotations

import argparse
import os
import re
import runpy
import sys

import torch

__all__ = ["add_magma_arguments", "magma_options", "install", "main"]


def _block(text: str) -> str | int:
    if text in ("tensor", "row"):
        return text
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise argparse.ArgumentTypeError(f"expected 'tensor', 'row' or an integer >= 1, got {text!r}")


def _pattern(text: str) -> re.Pattern:
    try:
        return re.compile(text)
    except re.error as error:
        raise argparse.ArgumentTypeError(f"not a regular expression: {text!r} ({error})") from None


def add_magma_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--magma`` and the ``--magma-*`` options (in a group "Magma") to ``parser``; returns it,
    as Megatron-LM's ``extra_args_provider`` must."""
    group = parser.add_argument_group("Magma", "magma_ext's Magma in place of Adam (magma_ext.megatron)")
    group.add_argument("--magma", action="store_true",
                       help="build Magma (over Adam) instead of Megatron's optimizer; needs --optimizer adam, whose "
                            "lr, weight decay, betas and eps it takes")
    group.add_argument("--magma-keep-prob", type=float, default=0.5, help="probability of applying a block's update")
    group.add_argument("--magma-block", type=_block, default="tensor", help="masking unit: tensor, row or N elements")
    group.add_argument("--magma-seed", type=int, default=None, help="the masks' seed (default: --seed)")
    group.add_argument("--magma-tau", type=float, default=2.0, help="temperature of the alignment score")
    group.add_argument("--magma-score-ema", type=float, default=0.9, help="EMA coefficient of the score")
    group.add_argument("--magma-base", choices=("adam", "rmsprop", "laprop"), default="adam", help="base optimizer")
    group.add_argument("--magma-mask", choices=("magma", "skip", "none"), default="magma", help="masking rule")
    group.add_argument("--magma-moments", choices=("float32", "bfloat16"), default="float32",
                       help="dtype of Magma's exp_avg and exp_avg_sq (bfloat16: stochastically rounded; Megatron's "
                            "own --exp-avg-dtype belongs to its precision-aware optimizer and is refused)")
    group.add_argument("--magma-masked", type=_pattern, default=None,
                       help="a regular expression: the parameters whose global names it matches (re.search) are "
                            "masked (default: attention and MLP weights, as the paper)")
    group.add_argument("--magma-sparse-param-gather", action="store_true",
                       help="with the distributed optimizer, all-gather only the parameters Magma changed")
    return parser


def magma_options(args: argparse.Namespace) -> dict:
    """``get_megatron_magma_optimizer``'s keywords from parsed arguments (:func:`add_magma_arguments`;
    the seed defaults to Megatron-LM's ``--seed``, else 0)."""
    seed = args.magma_seed if args.magma_seed is not None else getattr(args, "seed", 0)
    options = dict(keep_prob=args.magma_keep_prob, block=args.magma_block, seed=seed, tau=args.magma_tau,
                   score_ema=args.magma_score_ema, base=args.magma_base, mask=args.magma_mask,
                   sparse_param_gather=args.magma_sparse_param_gather)
    if args.magma_moments != "float32":
        options["exp_avg_dtype"] = options["exp_avg_sq_dtype"] = getattr(torch, args.magma_moments)
    if args.magma_masked is not None:
        pattern = args.magma_masked
        options["masked"] = lambda name, param: pattern.search(name) is not None
    return options


def _with_magma_arguments(extra_args_provider):
    def provider(parser):
        if extra_args_provider is not None:
            parser = extra_args_provider(parser)
        return add_magma_arguments(parser)
    return provider


def install(training=None, arguments=None, get_args=None) -> None:
    """Make Megatron-LM's loop build Magma when ``--magma`` is given.

    ``training``, ``arguments``, ``get_args``: the modules ``megatron.training.training`` and
    ``megatron.training.arguments`` and the function ``megatron.training.get_args`` (imported
    when None). Their ``parse_and_validate_args`` and ``get_megatron_optimizer`` are replaced
    (once: a second call changes nothing); the factory reads the arguments when Megatron builds
    the optimizer.

    Raises RuntimeError when Megatron-LM lacks either name (another release's layout).
    """
    if training is None or arguments is None or get_args is None:
        import megatron.training.arguments as arguments_module
        import megatron.training.training as training_module
        from megatron.training import get_args as get_args_function

        training, arguments, get_args = training_module, arguments_module, get_args_function
    for module, name in ((arguments, "parse_and_validate_args"), (training, "get_megatron_optimizer")):
        if not callable(getattr(module, name, None)):
            raise RuntimeError(f"{getattr(module, '__name__', module)} has no {name}: magma_ext.megatron.training "
                               "was written for Megatron-LM's megatron/training of megatron-core 0.19")
    if getattr(training.get_megatron_optimizer, "_magma_installed", False):
        return
    parse, megatron_factory = arguments.parse_and_validate_args, training.get_megatron_optimizer

    def parse_and_validate_args(extra_args_provider=None, *args, **kwargs):
        return parse(_with_magma_arguments(extra_args_provider), *args, **kwargs)

    def get_megatron_optimizer(config, model_chunks, *args, **kwargs):
        parsed = get_args()
        if not getattr(parsed, "magma", False):
            return megatron_factory(config, model_chunks, *args, **kwargs)
        from .optimizer import get_megatron_magma_optimizer

        return get_megatron_magma_optimizer(config, model_chunks, *args, **kwargs, **magma_options(parsed))

    get_megatron_optimizer._magma_installed = True
    arguments.parse_and_validate_args = parse_and_validate_args
    training.get_megatron_optimizer = get_megatron_optimizer


def main(argv: list[str] | None = None) -> None:
    """``python -m magma_ext.megatron.training PRETRAIN_SCRIPT [ARGS...]``: :func:`install`, then
    run ``PRETRAIN_SCRIPT`` as ``__main__`` with ``ARGS`` as its command line."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or not argv[0].endswith(".py") or not os.path.isfile(argv[0]):
        raise SystemExit("usage: python -m magma_ext.megatron.training PRETRAIN_SCRIPT.py [Megatron-LM arguments] "
                         "--magma [--magma-* options]")
    script = os.path.abspath(argv[0])
    sys.argv = [script, *argv[1:]]
    sys.path.insert(0, os.path.dirname(script))
    install()
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
