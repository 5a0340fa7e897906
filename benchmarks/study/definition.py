"""The study as data: its editions, each with model sizes, optimizer recipes, tiers of runs, the
paper's claim and the page's prose.

Edition 1 (:data:`FIRST`, issue 9; records in ``benchmarks/results/convergence/``) trained 300
steps of 32 x 256 bytes at about 10M and 50M parameters with the demo's loop
(``magma_ext.demo``): a few million tokens, far from the paper's budget. Its data stay here
unchanged so that its records and page still load and rebuild.

Edition 2 (:data:`SECOND`, issue 13; the default for new runs) follows the paper's protocol
(GaLore's: Llama, batch x 256 tokens, about 20 tokens per parameter, 10% linear warm-up then
cosine decay to 10% of the peak, best-lr final validation perplexity), scaled to byte-level
models of about 10M (S) and 30M (M) parameters, in three tiers that run in order (each lands
before the next starts). Its runs use the study's own training loop (:mod:`.trainer`:
torch.compile, bf16 autocast, no host sync per step) on a corpus built from the installed
Python's files (:mod:`.corpus`), read without replacement.

A (size, optimizer) pair is a *cell*; a cell's runs never leave its shard. Nothing here imports
torch or runs anything. The runner builds what a :class:`Recipe` names (:mod:`.optimizers`);
the report takes the optimizers' order, colours, fused paths and the page's prose from the
edition of its records. An optimizer added to an edition's ``optimizers`` and to one of its
tiers is planned, run, plotted and described on the page without a change to their code.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

# Edition 1: the whole standard library of CPython 3.11/3.12 (~30 MB of *.py).
DEFAULT_MAX_BYTES = 48 * 2**20
WEIGHT_DECAY = 0.1
KEEP_PROB = 0.5
# Magma's temperature of the alignment score: the paper's tau = 2 (magma_ext's default too).
TAU = 2.0
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

    Time estimates (``--plan``, ``--time-budget-s``) come from ``tokens_per_s`` where it is set
    (edition 2: whole training steps per second of one GPU, all runs sharing it together) and
    else from ``step_ms``/``eval_batch_ms`` (edition 1: measured H100 costs, bf16 autocast,
    eager). ``side_by_side`` is how many runs share one GPU as separate processes (edition 2).
    ``final_eval_batches`` (default ``eval_batches``) is the size of the last evaluation, whose
    loss is the run's final validation loss; ``train_points`` bounds the points of the stored
    training-loss curve (each the mean over its steps).
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
    final_eval_batches: int | None = None
    train_points: int = 0  # 0: every step (edition 1)
    step_ms: dict = field(default_factory=dict, compare=False)
    eval_batch_ms: float = 0.0
    setup_s: float = 0.5
    tokens_per_s: float | None = None
    side_by_side: int = 1

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

    @property
    def training_bytes_needed(self) -> int:
        """Bytes of training data that one run reads without seeing a byte twice: its windows
        of ``seq_len`` inputs follow each other, each one's last target the next one's first input."""
        return self.tokens + 1

    @property
    def eval_tokens(self) -> int:
        """Tokens of every evaluation of one run (step 0, the periodic ones and the final one)."""
        periodic = self.steps // self.eval_every  # the last one is the final evaluation
        final = self.final_eval_batches or self.eval_batches
        return (periodic * self.eval_batches + final) * self.batch_size * self.seq_len

    def step_estimate_ms(self, optimizer: str) -> float:
        if self.tokens_per_s:
            return 1000 * self.batch_size * self.seq_len / self.tokens_per_s
        return self.step_ms.get(optimizer, self.step_ms.get("AdamW", 10.0))

    def step_seconds(self) -> float:
        """With ``tokens_per_s``: GPU seconds of one run's training and evaluation steps (an
        evaluated token costs about a third of a trained one: forward only)."""
        return (self.tokens + self.eval_tokens / 3) / self.tokens_per_s

    def wall_s(self, side_by_side: int) -> float:
        """With ``tokens_per_s``: wall seconds of one run among ``side_by_side`` on a GPU."""
        return self.setup_s + side_by_side * self.step_seconds()

    def estimate_s(self, optimizer: str) -> float:
        """Estimated seconds of one run. With ``tokens_per_s``: the GPU seconds it costs, its
        start-up shared with the runs beside it (a GPU runs the others meanwhile); else the wall
        seconds of a run alone (training, evaluations, set-up)."""
        if self.tokens_per_s:
            return self.setup_s / self.side_by_side + self.step_seconds()
        evaluations = self.steps // self.eval_every + 2
        eval_s = evaluations * self.eval_batches * self.eval_batch_ms / 1000
        return self.setup_s + self.steps * self.step_estimate_ms(optimizer) / 1000 + eval_s


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
    ``paper_name`` is the paper's name for it, where the paper reports it.
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
    paper_name: str | None = None

    def __post_init__(self):
        if self.fused not in FUSED_PATHS:
            raise ValueError(f"{self.name}: fused must be one of {FUSED_PATHS}, got {self.fused!r}")

    @property
    def uses_magma(self) -> bool:
        return self.builder == "magma"


def _magma(name: str, lrs: tuple[float, ...], base: str, mask: str, description: str, color: str,
           baseline: bool, tau: float | None = None, paper_name: str | None = None) -> Recipe:
    options = {"base": base, "mask": mask, "keep_prob": KEEP_PROB} | ({"tau": tau} if tau is not None else {})
    return Recipe(name, lrs, description, "magma", options, color, fused="magma_ext", baseline=baseline,
                  paper_name=paper_name)


# ---------------------------------------------------------------------------- tiers


@dataclass(frozen=True)
class Tier:
    """A group of cells that runs as a unit, in the edition's order.

    Every optimizer of ``optimizers`` gets a cell at ``size`` (a key of the edition's sizes).
    Without ``transfer_from``: a sweep over the recipe's grid with each of ``seeds``, then
    ``best_lr_seeds`` at the learning rate that ``seeds[0]`` found best. With it: one run per
    seed of ``seeds`` at each learning rate ``offset`` grid points from the best of the cell of
    the same optimizer at size ``transfer_from`` (0: that best lr, 1: the next point above; where
    the best is the top of the grid, the next point below stands in for the one above).
    """

    number: int
    size: str
    optimizers: tuple[str, ...]
    seeds: tuple[int, ...] = (0,)
    best_lr_seeds: tuple[int, ...] = ()
    transfer_from: str | None = None
    transfer_offsets: tuple[int, ...] = ()
    note: str = ""


# ---------------------------------------------------------------------------- the claim


@dataclass(frozen=True)
class PaperClaim:
    """What the paper reports, as the page checks it.

    ``relations`` are the pairwise orderings that ``ordering`` implies ("a < b": a reaches the
    lower perplexity). ``table`` holds the paper's numbers where the page shows them: its model
    size -> optimizer (this study's name) -> final validation perplexity.
    """

    ordering: str
    relations: tuple[tuple[str, str], ...]
    stable_range: str
    not_reproduced: str
    table: Mapping[str, Mapping[str, float]] = field(default_factory=dict, hash=False)
    table_source: str = ""


SUBJECT = "Magma"


# ---------------------------------------------------------------------------- editions


@dataclass(frozen=True)
class Edition:
    """One version of the study's protocol. ``sizes``/``tiers`` are the real study,
    ``quick_sizes``/``quick_tiers`` its CPU smoke test (``--quick``: the same tiers at tiny
    sizes, the ``quick_lrs`` middle points of each grid, ``quick_optimizers`` by default).

    ``harness`` is the training loop: "demo" (``magma_ext.demo.train``) or "study"
    (:mod:`.trainer`); ``corpus`` the default data: "stdlib" (the demo's loader) or
    "python-tree" (:mod:`.corpus`). ``results`` names the records' folder and page under
    ``benchmarks/results/``. ``plan_on_page``: the page lists the planned runs that have no
    record yet.
    """

    number: int
    sizes: Mapping[str, Size]
    optimizers: Mapping[str, Recipe]
    tiers: tuple[Tier, ...]
    quick_sizes: Mapping[str, Size]
    quick_tiers: tuple[Tier, ...]
    quick_optimizers: tuple[str, ...]
    reference: str
    paper: PaperClaim
    shared_recipe: str
    design: str
    stable_within: float
    harness: str
    corpus: str
    results: str
    weight_decay: float = WEIGHT_DECAY
    default_max_bytes: int | None = None
    quick_lrs: int = 2
    plan_on_page: bool = False

    def title(self) -> str:
        """The page's title: the subject against every baseline of the edition's optimizers."""
        baselines = and_join([r.name for r in self.optimizers.values() if r.baseline])
        return f"Convergence: {SUBJECT} against {baselines}" + (f" (edition {self.number})" if self.number > 1 else "")

    def lrs(self, recipe: Recipe, quick: bool) -> tuple[float, ...]:
        """The recipe's grid, or its ``quick_lrs`` middle points for ``--quick``."""
        if not quick:
            return recipe.lrs
        middle = len(recipe.lrs) // 2
        return recipe.lrs[middle - self.quick_lrs // 2: middle - self.quick_lrs // 2 + self.quick_lrs]

    def optimizer_rank(self, name: str) -> tuple[int, str]:
        """Sort key: the order of ``optimizers``, names it lacks after them alphabetically."""
        order = list(self.optimizers)
        return (order.index(name) if name in order else len(order), name)


# ---------------------------------------------------------------------------- edition 1 (issue 9)

# Step costs measured on an H100 (2026-11, torch 2.11, the first pilot of this study): the demo's
# loop waits for every step's loss, and at these widths the step is bound by the host launching
# kernels, so the 10M model steps only ~1.8x faster than the 50M one and torch's Muon (one
# Newton-Schulz loop per matrix) costs ~20-40 ms more per step.
FIRST_SIZES = {
    "10M": Size("10M", dim=384, layers=6, heads=6, steps=300,
                step_ms={"AdamW": 25.0, "RMSProp": 24.0, "SkipUpdate": 22.0, "Magma-Adam": 28.0,
                         "Magma-RMSProp": 28.0, "Muon": 45.0}, eval_batch_ms=8.0),
    "50M": Size("50M", dim=640, layers=10, heads=10, steps=300,
                step_ms={"AdamW": 45.0, "RMSProp": 46.0, "SkipUpdate": 42.0, "Magma-Adam": 45.0,
                         "Magma-RMSProp": 47.0, "Muon": 82.0}, eval_batch_ms=14.0),
}
QUICK_SIZE = Size("tiny", dim=64, layers=2, heads=2, steps=30, batch_size=8, seq_len=64, eval_batches=2,
                  evals=3, step_ms={"AdamW": 30.0}, eval_batch_ms=5.0)

# Grids are powers of two apart. A pilot on the 10M model (600 steps, seed 0) found AdamW best
# at 1e-3 and RMSProp at 5e-4, both degrading fast above, and Muon best at 0.02; the grids put
# those optima on their second or third point. Magma applies about keep_prob * s ~ 1/4 of its
# base optimizer's update, so its grids sit 2-4x higher than its base's; SkipUpdate's kept
# updates are 1/keep_prob = 2x larger, so it shares RMSProp's grid.
# The order here is the order of every table, legend and --optimizers default.
FIRST_OPTIMIZERS: dict[str, Recipe] = {r.name: r for r in (
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

FIRST_PAPER = PaperClaim(
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
FIRST_SHARED_RECIPE = (
    "Shared: betas {betas}, weight decay {weight_decay} on 2-D weights "
    "(embedding, norms unmasked and undecayed via `magma_ext.param_groups`, the same split for "
    "AdamW), linear warm-up over the first 10% of steps then cosine decay to 10% of the peak, "
    "gradient clipping at 1.0, bfloat16 autocast on CUDA (float32 on CPU), no torch.compile. "
    "Validation: a fixed set of batches spread over the validation split, at step 0, every "
    "tenth of the run and at the end; perplexity is per byte, exp(val loss).")

# How the runs are laid out and judged; {shard_note} comes from the records.
FIRST_DESIGN = (
    "Design: every learning rate runs with the seeds of the table's last column; where a size "
    "lists seeds \"at the best lr of seed 0\", those run after that size's seed-0 sweep, at the "
    "learning rate the sweep found best (which favours that learning rate slightly, as seed 0 "
    "picked it). The best learning rate of a (size, optimizer) cell minimises the mean final "
    "validation perplexity over the seeds that every learning rate of the cell ran. A cell never "
    "leaves its shard, so every device call is self-contained{shard_note}.")

FIRST = Edition(
    number=1, sizes=FIRST_SIZES, optimizers=FIRST_OPTIMIZERS,
    tiers=(Tier(1, "10M", tuple(FIRST_OPTIMIZERS), seeds=(0, 1)),
           Tier(2, "50M", tuple(FIRST_OPTIMIZERS), seeds=(0,), best_lr_seeds=(1,))),
    quick_sizes={"10M": QUICK_SIZE, "50M": QUICK_SIZE},
    quick_tiers=(Tier(1, "10M", tuple(FIRST_OPTIMIZERS), seeds=(0,), best_lr_seeds=(1,)),),
    quick_optimizers=("AdamW", "Magma-Adam", "Muon"), reference="AdamW", paper=FIRST_PAPER,
    shared_recipe=FIRST_SHARED_RECIPE, design=FIRST_DESIGN, stable_within=0.10, harness="demo",
    corpus="stdlib", results="convergence", default_max_bytes=DEFAULT_MAX_BYTES)


# ---------------------------------------------------------------------------- edition 2 (issue 13)

# Whole-step training throughput of one GPU, all runs that share it together (bf16 autocast,
# torch.compile, fused AdamW), in tokens per second; they feed --plan and --time-budget-s.
# S measured on one H200 on 2026-11-26 (benchmarks/results/convergence2/throughput_S_h200_2026-11-26.json):
# 3.18M tokens/s for one run alone (`--mode throughput --size S`), 3.26M for four side by side
# (a 400-step --parallel 4 sweep): one run already fills the GPU. M measured on one H200 on
# 2026-12-03 by tier 3's first run, M__AdamW__lr0.001__seed0 (tier3_h200_2026-12-03_call22.json):
# 36.7 ms a step over its 10,000 steps, 1.78M tokens/s alone, 414 s of wall time.
# On one H100 (2026-12-06, tier3_h100_2026-12-06_call23.json to call28) M runs reached 1.60-1.63M
# tokens/s (AdamW, Magma-Adam, RMSProp and Magma-RMSProp alike) in 416-446 s of wall time.
TOKENS_PER_S = {"S": 3.2e6, "M": 1.78e6}
# Where each size's figures were measured (None: a placeholder still).
MEASURED_TOKENS_PER_S = {"S": "one H200, 2026-11-26", "M": "one H200, 2026-12-03"}
# Runs per GPU as separate processes: the smallest count that reaches the aggregate above.
# Measured for S only; M does 2.6x S's FLOPs per token, so one M run fills the GPU at least as well.
SIDE_BY_SIDE = {"S": 1, "M": 1}
MEASURED_SIDE_BY_SIDE = {"S": True, "M": False}
# Wall seconds a run spends outside its training steps: process start, imports, loading the
# corpus onto the GPU, torch.compile (the FX graph cache makes later compiles of a size cheap).
# The 13 S runs of 2026-11-26 on H200s took 67-93 s each against 62 s of steps and evaluations
# at 3.2M tokens/s: 5-31 s more, the most for the first compile on a fresh machine.
RUN_START_S = 30.0

# The default corpus (the Python tree) of the H200 machine image holds about 475M training bytes:
# enough for S, not for M (655M). Tier 3 adds these folders and file kinds, which built 715M
# training bytes there (benchmarks/results/convergence2/corpus_M_probe_h200_2026-12-03.log);
# `--plan` suggests them when the corpus falls short.
LARGER_CORPUS_FLAGS = ("--corpus-add /usr/include,/usr/local/cuda/include,/usr/share/doc,/usr/lib/python3/dist-packages "
                       "--corpus-suffixes .py,.h,.rst,.txt,.c,.cc,.cpp,.hpp,.cuh,.cu,.md,.pyi")

# Llama shapes with head_dim 64 and depth/width of GaLore's Llamas (60M: 512 x 8, 130M: 768 x 12);
# with the byte vocabulary the embedding and LM head are only 2 x 256 x dim parameters.
# S: 10.82M parameters, 6,000 x 128 x 256 = 196.6M tokens (18.2 per parameter);
# M: 29.17M parameters, 10,000 x 256 x 256 = 655.4M tokens (22.5 per parameter).
SECOND_SIZES = {
    "S": Size("S", dim=384, layers=6, heads=6, steps=6000, batch_size=128, seq_len=256, eval_batches=16,
              evals=20, final_eval_batches=64, train_points=200, tokens_per_s=TOKENS_PER_S["S"],
              side_by_side=SIDE_BY_SIDE["S"], setup_s=RUN_START_S),
    "M": Size("M", dim=512, layers=9, heads=8, steps=10000, batch_size=256, seq_len=256, eval_batches=8,
              evals=20, final_eval_batches=32, train_points=200, tokens_per_s=TOKENS_PER_S["M"],
              side_by_side=SIDE_BY_SIDE["M"], setup_s=RUN_START_S),
}
SECOND_QUICK_SIZES = {
    "S": Size("tinyS", dim=64, layers=2, heads=2, steps=24, batch_size=8, seq_len=64, eval_batches=2, evals=3,
              final_eval_batches=3, train_points=8, tokens_per_s=4e4, setup_s=1.0),
    "M": Size("tinyM", dim=64, layers=3, heads=2, steps=16, batch_size=8, seq_len=64, eval_batches=2, evals=2,
              final_eval_batches=3, train_points=8, tokens_per_s=3e4, setup_s=1.0),
}

# The paper's grid {1e-4, 5e-4, 1e-3, 5e-3, 1e-2}, plus 2e-2 and 5e-2 for its claim that
# Adam+Magma stays effective up to 0.05. One grid for every optimizer, as in the paper.
GRID = (1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 2e-2, 5e-2)

SECOND_OPTIMIZERS: dict[str, Recipe] = {r.name: r for r in (
    Recipe("AdamW", GRID, "torch.optim.AdamW (fused=True on CUDA)", "adamw", color="tab:blue", fused="torch",
           paper_name="Adam"),
    _magma("Magma-Adam", GRID, "adam", "magma",
           f'magma_ext.Magma(base="adam", mask="magma", keep_prob={KEEP_PROB}, tau={TAU:g})', "tab:orange",
           baseline=False, tau=TAU, paper_name="Adam+Magma"),
    _magma("RMSProp", GRID, "rmsprop", "none",
           'magma_ext.Magma(base="rmsprop", mask="none"): the paper\'s RMSProp, g_t / (sqrt(v_t) + eps) '
           "with bias-corrected v, no momentum in the update", "tab:gray", baseline=True, paper_name="RMSProp"),
    _magma("Magma-RMSProp", GRID, "rmsprop", "magma",
           f'magma_ext.Magma(base="rmsprop", mask="magma", keep_prob={KEEP_PROB}, tau={TAU:g}): the mask\'s '
           "cosine uses the first moment that includes g_t", "tab:red", baseline=False, tau=TAU,
           paper_name="RMSProp+Magma"),
    _magma("LaProp", GRID, "laprop", "none", 'magma_ext.Magma(base="laprop", mask="none"): dense LaProp',
           "tab:purple", baseline=True, paper_name="LaProp"),
    _magma("Magma-LaProp", GRID, "laprop", "magma",
           f'magma_ext.Magma(base="laprop", mask="magma", keep_prob={KEEP_PROB}, tau={TAU:g})', "tab:pink",
           baseline=False, tau=TAU, paper_name="LaProp+Magma"),
    _magma("SkipUpdate", GRID, "rmsprop", "skip",
           f'magma_ext.Magma(base="rmsprop", mask="skip", keep_prob={KEEP_PROB}): SkipUpdate(RMSProp), '
           "kept blocks scaled by 1/keep_prob", "tab:brown", baseline=True),
    Recipe("Muon", GRID,
           "torch.optim.Muon (hidden 2-D weights; momentum 0.95, Nesterov, 5 Newton-Schulz steps) "
           f"+ AdamW at {MUON_ADAMW_LR_RATIO} x lr for embedding, LM head and norms: the outside reference",
           "muon", {"adamw_lr_ratio": MUON_ADAMW_LR_RATIO}, color="tab:green", fused="none",
           fused_note="torch Muon"),
)}

TIER_1 = ("AdamW", "Magma-Adam", "RMSProp", "Magma-RMSProp")
TIER_2 = ("LaProp", "Magma-LaProp", "SkipUpdate", "Muon")
SECOND_TIERS = (
    Tier(1, "S", TIER_1, seeds=(0,), best_lr_seeds=(1, 2),
         note="the paper's four over the grid, seed 0; then seeds 1 and 2 at each one's best lr"),
    Tier(2, "S", TIER_2, seeds=(0,), best_lr_seeds=(1, 2), note="LaProp, its Magma, SkipUpdate and Muon, the same way"),
    Tier(3, "M", TIER_1, seeds=(0,), transfer_from="S", transfer_offsets=(0, 1),
         note="tier 1's four at their S-best lr and the next grid point above, seed 0"),
)
SECOND_QUICK_TIERS = (  # the smoke test's: one extra seed at the best lr instead of two
    Tier(1, "S", TIER_1, seeds=(0,), best_lr_seeds=(1,), note=SECOND_TIERS[0].note.replace("1 and 2", "1")),
    Tier(2, "S", TIER_2, seeds=(0,), best_lr_seeds=(1,), note=SECOND_TIERS[1].note),
    SECOND_TIERS[2],
)

# The paper's Table 1: final validation perplexity of Llama on C4 (GaLore's protocol).
SECOND_PAPER = PaperClaim(
    ordering="Magma-RMSProp < Magma-LaProp, Magma-Adam < RMSProp < LaProp < AdamW (at 60M and 130M parameters)",
    relations=(("Magma-Adam", "AdamW"), ("Magma-RMSProp", "RMSProp"), ("Magma-LaProp", "LaProp"),
               ("Magma-RMSProp", "Magma-Adam"), ("Magma-RMSProp", "Magma-LaProp"),
               ("RMSProp", "LaProp"), ("LaProp", "AdamW")),
    stable_range="the paper claims Adam+Magma stays effective up to lr 0.05, where Adam degrades outside "
                 "about 1e-3 to 3e-3",
    not_reproduced="Not reproduced: the paper's models (Llama with a 32K-token vocabulary at 60M and 130M "
                   "parameters), its data (C4) and its token-level perplexities. This edition keeps the "
                   "protocol (about 20 tokens per parameter, the schedule, the grid, best-lr selection, what "
                   "Magma masks) at byte level and at 11M and 29M parameters; compare the relative "
                   "differences to Adam, not the absolute perplexities. Differences smaller than the seed "
                   "ranges above are not evidence either way.",
    table={"60M": {"AdamW": 30.79, "Magma-Adam": 29.09, "LaProp": 29.98, "Magma-LaProp": 29.05,
                   "RMSProp": 29.29, "Magma-RMSProp": 28.55},
           "130M": {"AdamW": 24.77, "Magma-Adam": 22.08, "LaProp": 23.07, "Magma-LaProp": 22.16,
                    "RMSProp": 22.64, "Magma-RMSProp": 21.66}},
    table_source="arXiv 2602.15322, Table 1 (Llama on C4, batch 512 x 256 tokens, 10K steps at 60M)",
)

SECOND_SHARED_RECIPE = (
    "Shared: betas {betas}, decoupled weight decay {weight_decay} on 2-D weights (not on the "
    "embedding or norms; AdamW decays what `magma_ext.param_groups` decays, via "
    "`magma_ext.decay_groups`); Magma masks the attention and MLP weights only (not the LM head, "
    "embedding or norms), tau 2, keep probability 0.5. The paper's schedule: linear warm-up over "
    "the first 10% of steps, then cosine decay to 10% of the peak; gradient clipping at 1.0; "
    "bfloat16 autocast and torch.compile of the model on CUDA (float32, eager on CPU). Each run "
    "reads windows of seq_len + 1 bytes at stride seq_len in a seeded random order without "
    "replacement, so no run sees a training byte twice. Validation: fixed windows spread over "
    "the held-out split at step 0 and every twentieth of the run; the final perplexity is "
    "measured on more windows. Perplexity is per byte, exp(val loss).")

SECOND_DESIGN = (
    "Design (issue 13): the paper's protocol (GaLore's: Llama, 10% warm-up then cosine to 10% of the "
    "peak, learning rates 1e-4, 5e-4, 1e-3, 5e-3 and 1e-2, the final validation perplexity at the "
    "best lr), scaled to byte-level models of about 10M (S) and 30M (M) parameters at about 20 tokens "
    "per parameter, with 2e-2 and 5e-2 added to the grid for the robustness claim. Tier 1 (S): AdamW, "
    "Magma-Adam, RMSProp and Magma-RMSProp over the grid with seed 0, then seeds 1 and 2 at each "
    "one's best lr. Tier 2 (S): LaProp, Magma-LaProp, SkipUpdate and Muon the same way. Tier 3 (M): "
    "tier 1's four at their S-best lr and the next grid point above, seed 0. The best learning rate "
    "of a cell minimises the mean final validation perplexity over the seeds that every learning "
    "rate of the cell ran; the extra seeds at it favour it slightly, as seed 0 picked it{shard_note}.")

SECOND = Edition(
    number=2, sizes=SECOND_SIZES, optimizers=SECOND_OPTIMIZERS, tiers=SECOND_TIERS,
    quick_sizes=SECOND_QUICK_SIZES, quick_tiers=SECOND_QUICK_TIERS, quick_optimizers=("AdamW", "Magma-Adam"),
    reference="AdamW", paper=SECOND_PAPER, shared_recipe=SECOND_SHARED_RECIPE, design=SECOND_DESIGN,
    stable_within=0.05, harness="study", corpus="python-tree", results="convergence2", plan_on_page=True)

EDITIONS = {e.number: e for e in (FIRST, SECOND)}
DEFAULT_EDITION = 2


def edition(number: int) -> Edition:
    if number not in EDITIONS:
        raise ValueError(f"no edition {number} of the study; there are {sorted(EDITIONS)}")
    return EDITIONS[number]


# ---------------------------------------------------------------------------- prose helpers

_NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve")


def spelled(n: int) -> str:
    """A small count in words ("six"), larger ones in digits."""
    return _NUMBERS[n] if 0 <= n < len(_NUMBERS) else str(n)


def and_join(names: list[str]) -> str:
    """"a, b and c"."""
    return " and ".join(filter(None, [", ".join(names[:-1]), names[-1]])) if names else ""


def summary_line() -> str:
    """One line for ``--help``."""
    return ("Convergence study of Magma against other optimizers on byte-level Llama models: "
            + "; ".join(f"edition {e.number}: {spelled(len(e.optimizers))} optimizers, {spelled(len(e.tiers))} "
                        f"tiers at sizes {', '.join(dict.fromkeys(t.size for t in e.tiers))}"
                        for e in EDITIONS.values()) + ".")
