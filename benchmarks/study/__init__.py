"""The convergence study of Magma against other optimizers, one job per module.

Imports run one way, from a layer to the layers below it (tests/test_convergence_tools.py
checks it)::

    4  cli                         the command line: benchmarks/convergence.py
    3  sweep, throughput           running an invocation's runs one after another; timing the
                                   steps of every optimizer
       report                      records in, figures and the page out
    2  trainer                     the training loop: one run, compiled, checkpointed
       page, plots                 the Markdown page; the figures
    1  plan                        the run list of the tiers, --resume, lr choice, estimates
       optimizers, environment     building a recipe's optimizer; env and command of a record
       corpus                      the corpus: built from the installed Python's files
       summary                     best lr, stable range, seed ranges
    0  definition                  the study as data: sizes, recipes, tiers, claim, prose
       records                     the JSON schema of bundles: write, read, merge

Only sweep, throughput, trainer, optimizers and environment import torch (plan imports it to
count parameters, plots imports matplotlib to draw), so the report runs where torch is absent.
"""
