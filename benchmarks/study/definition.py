"""The study as data: model sizes, optimizer recipes, the paper's claim and the page's prose.

Models, data and training loop are the demo's (``magma_ext.demo``): Llama-style decoders of
about 10M and 50M parameters on the bytes of the Python standard library (or ``--data``), a
fixed train/validation split, linear warm-up and cosine decay, gradient clipping at 1.0,
bfloat16 autocast on CUDA. Every run of a model size gets the same token budget, the same
initialisation and the same data order for a given seed; only the optimizer and its learning
rate differ.

Design: the 10M model gets the full sweep (4 learning rates x 2 seeds per optimizer); the 50M
model gets the sweep with seed 0 and then a second seed at the learning rate that seed 0 found
best. A (size, optimizer) pair is a *cell*; a cell's runs never leave its shard, so the
best-learning-rate run always finds its sweep.

Nothing here imports torch or runs anything. The runner builds what a :class:`Recipe` names
(:mod:`.optimizers`); the report takes the optimizers' order, colours, fused paths and the
page's prose from here. An optimizer added to :data:`OPTIMIZERS` is planned, run, plotted and
described on the page without a change to their code.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

# The whole standard library of CPython 3.11/3.12 (~30 MB of *.py): no run sees a byte twice.
DEFAULT_MAX_BYTES = 48 * 2**20
WEIGHT_DECAY = 0.1
KEEP_PROB = 0.5
# Muon's AdamW part (embedding, LM head, norms) runs at this fraction of Muon's learning rate,
# so one sweep moves both: Muon's 0.02 pairs with 2e-3, a point of AdamW's own grid.
MUON_ADAMW_LR_RATIO = 0.1
THROUGHPUT_DEFAULTS = {"warmup_steps": 10, "timed_steps": 30, "repeats": 5}
# Seconds per invocation outside the runs (imports, CUDA start, reading the corpus).
INVOCATION_OVERHEAD_S = 10.0


# ---------------------------------------------------------------------------- model sizes


@dataclass(frozen=True)
class Size:
    """A model size and its training budget.

    ``sweep_seeds`` run at every learning rate; ``best_lr_seeds`` run afterwards at the
    learning rate whose ``sweep_seeds[0]`` run reached the lowest validation loss.
    ``step_ms``/``eval_batch_ms`` are measured H100 costs (bf16 autocast, eager) that only
    feed the time estimates of ``--plan`` and ``--time-budget-s``.
    """

    name: str
    dim: int
    layers: int
    heads: int
    steps: int
    batch_size: int = 32
    seq_len: int = 256
    eval_batches: int = 20
    evals: int = 10  # evaluations after step 0, evenly spaced
    sweep_seeds: tuple[int, ...] = (0, 1)
    best_lr_seeds: tuple[int, ...] = ()
    step_ms: dict = field(default_factory=dict, compare=False)
    eval_batch_ms: float = 0.0
    setup_s: float = 0.5

    def model_config(self):
        """The demo's ``LlamaConfig`` of this size (imported here: the report needs no torch)."""
        from magma_ext.demo import LlamaConfig
        return LlamaConfig(dim=self.dim, n_layers=self.layers, n_heads=self.heads, max_seq_len=self.seq_len)

    @property
    def eval_every(self) -> int:
        return max(1, self.steps // self.evals)

    @property
    def tokens(self) -> int:
        return self.steps * self.batch_size * self.seq_len

    def step_estimate_ms(self, optimizer: str) -> float:
        return self.step_ms.get(optimizer, self.step_ms.get("AdamW", 10.0))

    def estimate_s(self, optimizer: str) -> float:
        """Estimated wall seconds of one run (training, evaluations, set-up)."""
        evaluations = self.steps // self.eval_every + 2
        eval_s = evaluations * self.eval_batches * self.eval_batch_ms / 1000
        return self.setup_s + self.steps * self.step_estimate_ms(optimizer) / 1000 + eval_s


# Step costs measured on an H100 (2026-11, torch 2.11, the first pilot of this study): the demo's
# loop waits for every step's loss, and at these widths the step is bound by the host launching
# kernels, so the 10M model steps only ~1.8x faster than the 50M one and torch's Muon (one
# Newton-Schulz loop per matrix) costs ~20-40 ms more per step.
SIZES = {
    "10M": Size("10M", dim=384, layers=6, heads=6, steps=300, sweep_seeds=(0, 1),
                step_ms={"AdamW": 25.0, "RMSProp": 24.0, "SkipUpdate": 22.0, "Magma-Adam": 28.0,
                         "Magma-RMSProp": 28.0, "Muon": 45.0}, eval_batch_ms=8.0),
    "50M": Size("50M", dim=640, layers=10, heads=10, steps=300, sweep_seeds=(0,), best_lr_seeds=(1,),
                step_ms={"AdamW": 45.0, "RMSProp": 46.0, "SkipUpdate": 42.0, "Magma-Adam": 45.0,
                         "Magma-RMSProp": 47.0, "Muon": 82.0}, eval_batch_ms=14.0),
}
QUICK_SIZE = Size("tiny", dim=64, layers=2, heads=2, steps=30, batch_size=8, seq_len=64, eval_batches=2,
                  evals=3, sweep_seeds=(0,), best_lr_seeds=(1,), step_ms={"AdamW": 30.0}, eval_batch_ms=5.0)


# ---------------------------------------------------------------------------- optimizer recipes

# Where a recipe's optimizer step runs fused on CUDA (the page's "fused" column).
FUSED_PATHS = ("magma_ext", "torch", "none")


@dataclass(frozen=True)
class Recipe:
    """An optimizer of the study: how to build it, its learning-rate grid, how the report shows it.

    ``builder`` names a builder of :mod:`.optimizers` ("adamw", "magma", "muon"), ``options``
    its keyword arguments. ``description`` is the human-readable recipe that goes into every
    record and onto the page. ``fused`` is where its step runs fused on CUDA: "magma_ext" (the
    extension's kernels when built), "torch" (torch's ``fused=True``) or "none" (then
    ``fused_note`` says why). ``baseline`` marks the optimizers Magma is compared against.
    """

    name: str
    lrs: tuple[float, ...]
    description: str
    builder: str
    options: Mapping[str, object] = field(default_factory=dict, hash=False)
    color: str | None = None
    fused: str = "none"
    fused_note: str = ""
    baseline: bool = True

    def __post_init__(self):
        if self.fused not in FUSED_PATHS:
            raise ValueError(f"{self.name}: fused must be one of {FUSED_PATHS}, got {self.fused!r}")

    @property
    def uses_magma(self) -> bool:
        return self.builder == "magma"


def _magma(name: str, lrs: tuple[float, ...], base: str, mask: str, description: str, color: str,
           baseline: bool) -> Recipe:
    return Recipe(name, lrs, description, "magma", {"base": base, "mask": mask, "keep_prob": KEEP_PROB}, color,
                  fused="magma_ext", baseline=baseline)


# Grids are powers of two apart. A pilot on the 10M model (600 steps, seed 0) found AdamW best
# at 1e-3 and RMSProp at 5e-4, both degrading fast above, and Muon best at 0.02; the grids put
# those optima on their second or third point. Magma applies about keep_prob * s ~ 1/4 of its
# base optimizer's update, so its grids sit 2-4x higher than its base's; SkipUpdate's kept
# updates are 1/keep_prob = 2x larger, so it shares RMSProp's grid.
# The order here is the order of every table, legend and --optimizers default.
OPTIMIZERS: dict[str, Recipe] = {r.name: r for r in (
    Recipe("AdamW", (2.5e-4, 5e-4, 1e-3, 2e-3), "torch.optim.AdamW (fused=True on CUDA)", "adamw",
           color="tab:blue", fused="torch"),
    _magma("RMSProp", (1.25e-4, 2.5e-4, 5e-4, 1e-3), "rmsprop", "none",
           'magma_ext.Magma(base="rmsprop", mask="none"): dense RMSProp with bias-corrected v',
           "tab:gray", baseline=True),
    _magma("SkipUpdate", (1.25e-4, 2.5e-4, 5e-4, 1e-3), "rmsprop", "skip",
           f'magma_ext.Magma(base="rmsprop", mask="skip", keep_prob={KEEP_PROB})', "tab:brown", baseline=True),
    _magma("Magma-Adam", (1e-3, 2e-3, 4e-3, 8e-3), "adam", "magma",
           f'magma_ext.Magma(base="adam", mask="magma", keep_prob={KEEP_PROB})', "tab:orange", baseline=False),
    _magma("Magma-RMSProp", (2.5e-4, 5e-4, 1e-3, 2e-3), "rmsprop", "magma",
           f'magma_ext.Magma(base="rmsprop", mask="magma", keep_prob={KEEP_PROB})', "tab:red", baseline=False),
    Recipe("Muon", (5e-3, 1e-2, 2e-2, 4e-2),
           "torch.optim.Muon (hidden 2-D weights; momentum 0.95, Nesterov, 5 Newton-Schulz steps) "
           f"+ AdamW at {MUON_ADAMW_LR_RATIO} x lr for embedding, LM head and norms", "muon",
           {"adamw_lr_ratio": MUON_ADAMW_LR_RATIO}, color="tab:green", fused="none", fused_note="torch Muon"),
)}
# The optimizer that the throughput table and the paper's ordering measure the others against.
REFERENCE = "AdamW"
QUICK_OPTIMIZERS = ("AdamW", "Magma-Adam", "Muon")
QUICK_LRS = 2  # the middle two of each grid


def quick_lrs(recipe: Recipe) -> tuple[float, ...]:
    middle = len(recipe.lrs) // 2
    return recipe.lrs[middle - QUICK_LRS // 2: middle - QUICK_LRS // 2 + QUICK_LRS]


def optimizer_rank(name: str) -> tuple[int, str]:
    """Sort key: the order of :data:`OPTIMIZERS`, names it lacks after them alphabetically."""
    order = list(OPTIMIZERS)
    return (order.index(name) if name in order else len(order), name)


# ---------------------------------------------------------------------------- the claim and the prose


@dataclass(frozen=True)
class PaperClaim:
    """What the paper reports, as the page checks it.

    ``relations`` are the pairwise orderings that ``ordering`` implies ("a < b": a reaches the
    lower perplexity).
    """

    ordering: str
    relations: tuple[tuple[str, str], ...]
    stable_range: str
    not_reproduced: str


SUBJECT = "Magma"
PAPER = PaperClaim(
    ordering="Magma-RMSProp < Magma-Adam / Muon < AdamW",
    relations=(("Magma-RMSProp", "Magma-Adam"), ("Magma-RMSProp", "Muon"),
               ("Magma-Adam", "AdamW"), ("Muon", "AdamW")),
    stable_range="the paper claims a much wider one for Magma",
    not_reproduced="Not reproduced at all: the paper's models, tokenizer, data and token budgets. This study "
                   "trains byte-level models of the sizes above on a few million tokens each, with learning-rate "
                   "grids of four points and one or two seeds; differences smaller than the seed ranges "
                   "above are not evidence either way.",
)

# The training recipe every optimizer shares; {betas} and {weight_decay} come from the records.
SHARED_RECIPE = (
    "Shared: betas {betas}, weight decay {weight_decay} on 2-D weights "
    "(embedding, norms unmasked and undecayed via `magma_ext.param_groups`, the same split for "
    "AdamW), linear warm-up over the first 10% of steps then cosine decay to 10% of the peak, "
    "gradient clipping at 1.0, bfloat16 autocast on CUDA (float32 on CPU), no torch.compile. "
    "Validation: a fixed set of batches spread over the validation split, at step 0, every "
    "tenth of the run and at the end; perplexity is per byte, exp(val loss).")

# How the runs are laid out and judged; {shard_note} comes from the records.
DESIGN = (
    "Design: every learning rate runs with the seeds of the table's last column; where a size "
    "lists seeds \"at the best lr of seed 0\", those run after that size's seed-0 sweep, at the "
    "learning rate the sweep found best (which favours that learning rate slightly, as seed 0 "
    "picked it). The best learning rate of a (size, optimizer) cell minimises the mean final "
    "validation perplexity over the seeds that every learning rate of the cell ran. A cell never "
    "leaves its shard, so every device call is self-contained{shard_note}.")

_NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve")


def spelled(n: int) -> str:
    """A small count in words ("six"), larger ones in digits."""
    return _NUMBERS[n] if 0 <= n < len(_NUMBERS) else str(n)


def and_join(names: list[str]) -> str:
    """"a, b and c"."""
    return " and ".join(filter(None, [", ".join(names[:-1]), names[-1]])) if names else ""


def title() -> str:
    """The page's title: the subject against every baseline of :data:`OPTIMIZERS`."""
    return f"Convergence: {SUBJECT} against {and_join([r.name for r in OPTIMIZERS.values() if r.baseline])}"


def summary_line() -> str:
    """One line for ``--help``."""
    return (f"Convergence study: {spelled(len(OPTIMIZERS))} optimizers, a learning-rate sweep each, "
            "on byte-level Llama models.")
