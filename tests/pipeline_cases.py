"""Pipeline-parallel Magma runs (torch.distributed.pipelining), shared by the multi-process tests.

Stages are split as torchtitan splits them (:func:`stage_module`: a copy of the whole model with
the other stages' layers deleted, names kept) or by ``pipeline()``'s tracer, and each builds
``Magma(stage.named_parameters())``. :func:`single_process_run` trains the unsplit model on the
same micro-batches, backward in the same order and with the same scaling, so the gradients the
optimizers see are the pipeline's bit for bit and any difference in the parameters is the
optimizer's.
"""

from __future__ import annotations

import copy

import torch

from magma_ext import Magma, number_parameters

BATCH, MICROBATCHES = 8, 4
WIDTH, IN_FEATURES, OUT_FEATURES = 6, 5, 3
LAYERS = 4
OPTIONS = dict(lr=0.03, weight_decay=0.1, keep_prob=0.5, seed=11)


class StagedModel(torch.nn.Module):
    """An input projection, ``LAYERS`` blocks in a ModuleDict (so deleting some keeps the
    others' names, as in torchtitan's models) and a norm and head; a deleted part is None."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Linear(IN_FEATURES, WIDTH)
        self.layers = torch.nn.ModuleDict(
            {str(i): torch.nn.Sequential(torch.nn.Linear(WIDTH, WIDTH), torch.nn.Tanh()) for i in range(LAYERS)})
        self.norm = torch.nn.LayerNorm(WIDTH)
        self.head = torch.nn.Linear(WIDTH, OUT_FEATURES, bias=False)

    def forward(self, x):
        h = self.embed(x) if self.embed is not None else x
        for layer in self.layers.values():
            h = layer(h)
        h = self.norm(h) if self.norm is not None else h
        return self.head(h) if self.head is not None else h


def stage_module(model: StagedModel, stage: int, num_stages: int) -> StagedModel:
    """Stage ``stage`` of ``num_stages``: a deep copy of ``model`` keeping its share of the layers
    (the embedding on the first stage, norm and head on the last), names unchanged."""
    module = copy.deepcopy(model)
    per_stage = LAYERS // num_stages
    for i in range(LAYERS):
        if i // per_stage != stage:
            del module.layers[str(i)]
    if stage != 0:
        module.embed = None
    if stage != num_stages - 1:
        module.norm = module.head = None
    return module


def batch(step: int, dp_rank: int = 0, dp_size: int = 1):
    """The inputs and targets of ``step``: the whole batch, or data-parallel rank ``dp_rank``'s rows."""
    gen = torch.Generator().manual_seed(5000 + step)
    inputs, targets = torch.randn(BATCH, IN_FEATURES, generator=gen), torch.randn(BATCH, OUT_FEATURES, generator=gen)
    rows = slice(dp_rank * BATCH // dp_size, (dp_rank + 1) * BATCH // dp_size)
    return inputs[rows], targets[rows]


def loss_fn(output, target):
    return torch.nn.functional.mse_loss(output, target)


def _state(optimizer, named) -> dict:
    """The state of each parameter of ``named`` (the optimizer's parameters in order), by name, from
    ``state_dict()`` (which gathers a sharded parameter's scores of N-element blocks)."""
    saved = optimizer.state_dict()["state"]
    return {name: {k: _local(v).clone() for k, v in saved[i].items()} for i, (name, _) in enumerate(named)}


def _local(value):
    """A state value as a plain CPU tensor (a DTensor's full tensor) or as it is."""
    if hasattr(value, "full_tensor"):
        return value.full_tensor()
    return value if isinstance(value, torch.Tensor) else torch.tensor(value)


def single_process_run(combo, steps, microbatches=MICROBATCHES, dp_size=1, named=True):
    """The unsplit model with ``Magma(model.named_parameters())`` (``model.parameters()`` unless
    ``named``), on one intra-op thread as the ranks run (a CPU kernel's reductions, LayerNorm's
    backward say, may split across threads and so add in another order). Each step runs the
    micro-batches of each data-parallel share in order (the schedules' backward order), sums the
    shares' gradients and divides by ``dp_size * microbatches`` (FSDP's average and the
    schedule's ``scale_grads``; a power of two, so the division is exact in any order).

    Returns per step ``{name: gradient}`` and ``{name: parameter}``, and the final state by name.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _single_process_run(combo, steps, microbatches, dp_size, named)
    finally:
        torch.set_num_threads(threads)


def _single_process_run(combo, steps, microbatches, dp_size, with_names):
    base, mask, block = combo
    model = StagedModel()
    named = list(model.named_parameters())
    optimizer = Magma(named if with_names else model.parameters(), base=base, mask=mask, block=block, **OPTIONS)
    grads, params = [], []
    for step in range(steps):
        total = {}
        for dp_rank in range(dp_size):
            inputs, targets = batch(step, dp_rank, dp_size)
            for x, y in zip(inputs.tensor_split(microbatches), targets.tensor_split(microbatches)):
                loss_fn(model(x), y).backward()
            for name, p in named:
                total[name] = p.grad if name not in total else total[name] + p.grad
            optimizer.zero_grad()
        for name, p in named:
            p.grad = total[name] / (dp_size * microbatches)
        optimizer.step()
        grads.append({name: p.grad.clone() for name, p in named})
        params.append({name: p.detach().clone() for name, p in named})
        optimizer.zero_grad()
    return grads, params, _state(optimizer, named)


def _schedule(name, stage, microbatches):
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe

    schedule = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[name]
    return schedule(stage, n_microbatches=microbatches, loss_fn=loss_fn)


def _pipeline_steps(schedule, module, optimizer, steps, stage, dp_rank=0, dp_size=1):
    """Train stage ``stage`` of two for ``steps`` steps; per step its gradients and parameters by
    name, and its final state."""
    named = list(module.named_parameters())
    grads, params = [], []
    for step in range(steps):
        inputs, targets = batch(step, dp_rank, dp_size)
        if stage == 0:
            schedule.step(inputs)
        else:
            schedule.step(target=targets)
        optimizer.step()
        grads.append({name: _local(p.grad).clone() for name, p in named})
        params.append({name: _local(p.detach()).clone() for name, p in named})
        optimizer.zero_grad()
    return grads, params, _state(optimizer, named)


def _stage(split, rank):
    """This rank's stage of two of :class:`StagedModel`, and whether its optimizer takes names.

    ``split``: "copied" (:func:`stage_module`, as torchtitan splits), "traced"
    (``torch.distributed.pipelining.pipeline`` cuts the traced model at the middle layer; the stage
    modules keep the names and the parameter objects) or "traced-numbered" (the same after
    ``number_parameters(model.parameters())`` on the whole model, with an optimizer given no names).
    """
    from torch.distributed.pipelining import PipelineStage, SplitPoint, pipeline

    if split == "copied":
        stage = PipelineStage(stage_module(StagedModel(), rank, 2), rank, 2, torch.device("cpu"))
        return stage, True
    model = StagedModel()
    if split == "traced-numbered":
        number_parameters(model.parameters())
    example = batch(0)[0].tensor_split(MICROBATCHES)[0]
    pipe = pipeline(model, mb_args=(example,), split_spec={f"layers.{LAYERS // 2}": SplitPoint.BEGINNING})
    return pipe.build_stage(rank, torch.device("cpu")), split == "traced"


def pipeline_body(rank, runs, steps):
    """Two pipeline stages, one per rank of two; ``runs``: ``(split, schedule name, combo)`` (see
    :func:`_stage`)."""
    out = {}
    for split, schedule_name, combo in runs:
        base, mask, block = combo
        stage, named = _stage(split, rank)
        schedule = _schedule(schedule_name, stage, MICROBATCHES)
        params = stage.submod.named_parameters() if named else stage.submod.parameters()
        optimizer = Magma(params, base=base, mask=mask, block=block, **OPTIONS)
        out[split, schedule_name, combo] = _pipeline_steps(schedule, stage.submod, optimizer, steps, rank)
    return out


def pipeline_fsdp_body(rank, runs, steps, microbatches):
    """Two pipeline stages, each FSDP2-sharded over two ranks: a (pp 2, dp 2) mesh of four."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.pipelining import PipelineStage

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "dp"))
    stage_index, dp_rank = mesh["pp"].get_local_rank(), mesh["dp"].get_local_rank()
    out = {}
    for schedule_name, combo in runs:
        base, mask, block = combo
        module = stage_module(StagedModel(), stage_index, 2)
        for layer in module.layers.values():
            fully_shard(layer, mesh=mesh["dp"])
        fully_shard(module, mesh=mesh["dp"])
        stage = PipelineStage(module, stage_index, 2, torch.device("cpu"), group=mesh.get_group("pp"))
        schedule = _schedule(schedule_name, stage, microbatches)
        optimizer = Magma(module.named_parameters(), base=base, mask=mask, block=block, **OPTIONS)
        out[schedule_name, combo] = _pipeline_steps(schedule, module, optimizer, steps, stage_index, dp_rank, 2)
    return out
