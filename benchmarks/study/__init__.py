"""The convergence study of Magma against other optimizers, one job per module.

Imports run one way, from a layer to the layers below it (tests/test_convergence_tools.py
checks it)::

    4  cli                         the command line: benchmarks/convergence.py, plot_convergence.py, -m
    3  report                      records in, figures and the page out
    2  sweep, throughput           training the runs; timing the optimizer steps
       page, plots                 the Markdown page; the figures
    1  plan                        the run list, shards, --resume, time estimates
       optimizers, environment     building a recipe's optimizer; env, data and command of a record
       summary                     best lr, stable range, seed ranges
    0  definition                  the study as data: sizes, optimizer recipes, the claim, the prose
       records                     the JSON schema of records and bundles: write, read, merge

Only sweep, throughput, optimizers and environment import torch (plan imports it to count
parameters, plots imports matplotlib to draw), so the report runs where torch is absent.
"""
