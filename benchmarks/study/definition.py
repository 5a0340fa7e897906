"""The study as data: model sizes, optimizer recipes, tiers of runs, the paper's claim and the
page's prose.

This is edition 2 of the study (issue 13; records in ``benchmarks/results/convergence2/``). It
follows the paper's protocol (GaLore's: Llama, batch x 256 tokens, about 20 tokens per parameter,
10% linear warm-up then cosine decay to 10% of the peak, best-lr final validation perplexity),
scaled to byte-level models of about 10M (S), 30M (M) and 50M (L, issue 33) parameters, in tiers
that run in order (each lands before the next starts). Its runs use the study's own training loop
(:mod:`.trainer`: torch.compile, bf16 autocast, no host sync per step) on a corpus built from the
installed Python's files (:mod:`.corpus`), read without replacement where it is long enough (L's
runs read theirs about 1.4 times). Edition 1's code (issue 9) was removed after commit 30d8086;
its page, ``benchmarks/results/convergence.md``, stays as it was.

A (size, optimizer) pair is a *cell*. Nothing here imports torch or runs anything. The runner
builds what a :class:`Recipe` names (:mod:`.optimizers`); the report takes the optimizers'
order, colours, fused paths and the page's prose from here. An optimizer added to
``optimizers`` and to one of the tiers is planned, run, plotted and described on the page
without a change to their code.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

WEIGHT_DECAY = 0.1
KEEP_PROB = 0.5
# Magma's temperature of the alignment score: the paper's tau = 2 (magma_ext's default too).
TAU = 2.0
# Muon's AdamW part (embedding, LM head, norms) runs at this fraction of Muon's learning rate,
# so one sweep moves both.
MUON_ADAMW_LR_RATIO = 0.1

# ---------------------------------------------------------------------------- corpora

# The default corpus: these files under the installed Python's standard library and site-packages.
SUFFIXES = (".py", ".h", ".rst", ".txt")
# The Python tree of the H200 machine image holds about 475M training bytes: enough for S, not for
# M (655M). M's corpus adds these folders and file kinds, which built 715M training bytes there
# (benchmarks/results/convergence2/corpus_M_probe_h200_2026-12-03.log).
CORPORA = {
    "python": ((), SUFFIXES),
    "larger": (("/usr/include", "/usr/local/cuda/include", "/usr/share/doc", "/usr/lib/python3/dist-packages"),
               SUFFIXES + (".c", ".cc", ".cpp", ".hpp", ".cuh", ".cu", ".md", ".pyi")),
}


# ---------------------------------------------------------------------------- model sizes


@dataclass(frozen=True)
class Size:
    """A model size and its training budget.

    Time estimates (``--plan``) come from ``tokens_per_s``: whole training steps per second of
    one GPU, plus ``setup_s`` of start-up per run. ``final_eval_batches`` (default
    ``eval_batches``) is the size of the last evaluation, whose loss is the run's final
    validation loss; ``train_points`` bounds the points of the stored training-loss curve (each
    the mean over its steps). ``corpus`` names its data in :data:`CORPORA`. ``max_passes`` is how
    often a run may read its training bytes: 1 (no byte twice), or more where the corpus is
    shorter than the run, each further pass in a new shuffled order.
    """

    name: str
    dim: int
    layers: int
    heads: int
    steps: int
    batch_size: int
    seq_len: int
    eval_batches: int
    tokens_per_s: float
    evals: int = 20  # evaluations after step 0, evenly spaced
    final_eval_batches: int | None = None
    train_points: int = 200
    setup_s: float = 30.0
    corpus: str = "python"
    max_passes: int = 1

    def __post_init__(self):
        if self.corpus not in CORPORA:
            raise ValueError(f"size {self.name}: corpus must be one of {sorted(CORPORA)}, got {self.corpus!r}")

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

    def estimate_s(self) -> float:
        """Seconds of one run alone on a GPU: start-up, training and evaluation (an evaluated
        token costs about a third of a trained one: forward only)."""
        return self.setup_s + (self.tokens + self.eval_tokens / 3) / self.tokens_per_s


# Whole-step training throughput of one GPU (bf16 autocast, torch.compile, fused AdamW), in tokens
# per second; they feed --plan. S measured on one H200 on 2026-11-26
# (benchmarks/results/convergence2/throughput_S_h200_2026-11-26.json): 3.18M tokens/s for one run
# alone, 3.26M for four side by side (benchmarks/results/convergence2_pilot/): one run already fills
# the GPU. M measured on one H200 on 2026-12-03 by tier 3's first run (tier3_h200_2026-12-03_call22.json):
# 1.78M tokens/s alone; on one H100 (2026-12-06) M runs reached 1.60-1.63M tokens/s. L is a
# placeholder until `--mode throughput --size L` measures it (`--plan` prints the command): M's rate
# scaled by the parameter counts.
TOKENS_PER_S = {"S": 3.2e6, "M": 1.78e6, "L": 1.0e6}
# Where each size's figure was measured (None: a placeholder still).
MEASURED_TOKENS_PER_S = {"S": "one H200, 2026-11-26", "M": "one H200, 2026-12-03", "L": None}

# Llama shapes with head_dim 64 and depth/width of GaLore's Llamas (60M: 512 x 8, 130M: 768 x 12);
# with the byte vocabulary the embedding and LM head are only 2 x 256 x dim parameters.
# S: 10.82M parameters, 6,000 x 128 x 256 = 196.6M tokens (18.2 per parameter);
# M: 29.17M parameters, 10,000 x 256 x 256 = 655.4M tokens (22.5 per parameter);
# L: 49.90M parameters, 7,500 x 512 x 256 = 983.0M tokens (19.7 per parameter), the paper's batch;
#    M's corpus holds 715M training bytes, so an L run reads them about 1.4 times.
# The evaluations of M and L read the same number of windows, so on one corpus the same ones.
SIZES = {
    "S": Size("S", dim=384, layers=6, heads=6, steps=6000, batch_size=128, seq_len=256, eval_batches=16,
              final_eval_batches=64, tokens_per_s=TOKENS_PER_S["S"]),
    "M": Size("M", dim=512, layers=9, heads=8, steps=10000, batch_size=256, seq_len=256, eval_batches=8,
              final_eval_batches=32, tokens_per_s=TOKENS_PER_S["M"], corpus="larger"),
    "L": Size("L", dim=640, layers=10, heads=10, steps=7500, batch_size=512, seq_len=256, eval_batches=4,
              final_eval_batches=16, tokens_per_s=TOKENS_PER_S["L"], corpus="larger", max_passes=2),
}
QUICK_SIZES = {  # tinyL reads more windows than the CPU tests' corpus of about 100 KB holds, as L does
    "S": Size("tinyS", dim=64, layers=2, heads=2, steps=24, batch_size=8, seq_len=64, eval_batches=2, evals=3,
              final_eval_batches=3, train_points=8, tokens_per_s=4e4, setup_s=1.0),
    "M": Size("tinyM", dim=64, layers=3, heads=2, steps=16, batch_size=8, seq_len=64, eval_batches=2, evals=2,
              final_eval_batches=3, train_points=8, tokens_per_s=3e4, setup_s=1.0),
    "L": Size("tinyL", dim=96, layers=3, heads=3, steps=40, batch_size=48, seq_len=64, eval_batches=2, evals=2,
              final_eval_batches=3, train_points=8, tokens_per_s=3e4, setup_s=1.0, max_passes=2),
}


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


def _magma(name: str, base: str, mask: str, description: str, color: str, baseline: bool,
           paper_name: str | None = None, state: Mapping[str, str] | None = None) -> Recipe:
    options = {"base": base, "mask": mask, "keep_prob": KEEP_PROB} | ({"tau": TAU} if mask == "magma" else {})
    options |= state or {}  # state_dtype, state_rounding: see optimizers.build_magma
    return Recipe(name, GRID, description, "magma", options, color, fused="magma_ext", baseline=baseline,
                  paper_name=paper_name)


# The paper's grid {1e-4, 5e-4, 1e-3, 5e-3, 1e-2}, plus 2e-2 and 5e-2 for its claim that
# Adam+Magma stays effective up to 0.05. One grid for every optimizer, as in the paper.
GRID = (1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 2e-2, 5e-2)

# The order here is the order of every table, legend and --optimizers default.
OPTIMIZERS: dict[str, Recipe] = {r.name: r for r in (
    Recipe("AdamW", GRID, "torch.optim.AdamW (fused=True on CUDA)", "adamw", color="tab:blue", fused="torch",
           paper_name="Adam"),
    _magma("Magma-Adam", "adam", "magma", f'magma_ext.Magma(base="adam", mask="magma", keep_prob={KEEP_PROB}, '
           f'tau={TAU:g})', "tab:orange", baseline=False, paper_name="Adam+Magma"),
    _magma("RMSProp", "rmsprop", "none",
           'magma_ext.Magma(base="rmsprop", mask="none"): the paper\'s RMSProp, g_t / (sqrt(v_t) + eps) '
           "with bias-corrected v, no momentum in the update", "tab:gray", baseline=True, paper_name="RMSProp"),
    _magma("Magma-RMSProp", "rmsprop", "magma",
           f'magma_ext.Magma(base="rmsprop", mask="magma", keep_prob={KEEP_PROB}, tau={TAU:g}): the mask\'s '
           "cosine uses the first moment that includes g_t", "tab:red", baseline=False, paper_name="RMSProp+Magma"),
    _magma("LaProp", "laprop", "none", 'magma_ext.Magma(base="laprop", mask="none"): dense LaProp',
           "tab:purple", baseline=True, paper_name="LaProp"),
    _magma("Magma-LaProp", "laprop", "magma",
           f'magma_ext.Magma(base="laprop", mask="magma", keep_prob={KEEP_PROB}, tau={TAU:g})', "tab:pink",
           baseline=False, paper_name="LaProp+Magma"),
    _magma("Magma-Adam-bf16", "adam", "magma",
           f'magma_ext.Magma(base="adam", mask="magma", keep_prob={KEEP_PROB}, tau={TAU:g}, '
           "exp_avg_dtype=torch.bfloat16, exp_avg_sq_dtype=torch.bfloat16): moments stored in bfloat16, "
           "rounded stochastically (issue 31)", "tab:olive", baseline=False, state={"state_dtype": "bfloat16"}),
    _magma("Magma-Adam-bf16-nearest", "adam", "magma",
           "Magma-Adam whose float32 moments are rounded to the nearest bfloat16 after every step: what "
           "bfloat16 state rounded to nearest carries from step to step (this study's emulation, not a "
           "magma_ext option; the step itself reads its moments before that rounding), to show what "
           "stochastic rounding buys", "tab:cyan", baseline=False,
           state={"state_dtype": "bfloat16", "state_rounding": "nearest"}),
    _magma("SkipUpdate", "rmsprop", "skip",
           f'magma_ext.Magma(base="rmsprop", mask="skip", keep_prob={KEEP_PROB}): SkipUpdate(RMSProp), '
           "kept blocks scaled by 1/keep_prob", "tab:brown", baseline=True),
    Recipe("Muon", GRID,
           "torch.optim.Muon (hidden 2-D weights; momentum 0.95, Nesterov, 5 Newton-Schulz steps) "
           f"+ AdamW at {MUON_ADAMW_LR_RATIO} x lr for embedding, LM head and norms: the outside reference",
           "muon", {"adamw_lr_ratio": MUON_ADAMW_LR_RATIO}, color="tab:green", fused="none",
           fused_note="torch Muon"),
)}


# ---------------------------------------------------------------------------- tiers


@dataclass(frozen=True)
class Tier:
    """A group of cells that runs as a unit, in the study's order.

    Every optimizer of ``optimizers`` gets a cell at ``size`` (a key of :data:`SIZES`).
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


TIER_1 = ("AdamW", "Magma-Adam", "RMSProp", "Magma-RMSProp")
TIER_2 = ("LaProp", "Magma-LaProp", "SkipUpdate", "Muon")
TIER_4 = ("Magma-Adam-bf16", "Magma-Adam-bf16-nearest")
TIER_5 = ("AdamW", "Magma-Adam")
TIERS = (
    Tier(1, "S", TIER_1, seeds=(0,), best_lr_seeds=(1, 2),
         note="the paper's four over the grid, seed 0; then seeds 1 and 2 at each one's best lr"),
    Tier(2, "S", TIER_2, seeds=(0,), best_lr_seeds=(1, 2), note="LaProp, its Magma, SkipUpdate and Muon, the same way"),
    Tier(3, "M", TIER_1, seeds=(0,), transfer_from="S", transfer_offsets=(0, 1),
         note="tier 1's four at their S-best lr and the next grid point above, seed 0"),
    Tier(4, "S", TIER_4, seeds=(0,), best_lr_seeds=(1, 2),
         note="Magma-Adam with bfloat16 moments, rounded stochastically and to nearest, as tier 1 (issue 31)"),
    Tier(5, "L", TIER_5, seeds=(0,), transfer_from="S", transfer_offsets=(0,),
         note="AdamW and Magma-Adam at their S-best lr, seed 0 (issue 33): a run reads M's corpus about 1.4 times"),
)
QUICK_TIERS = (  # the smoke test's: one extra seed at the best lr instead of two
    Tier(1, "S", TIER_1, seeds=(0,), best_lr_seeds=(1,), note=TIERS[0].note.replace("1 and 2", "1")),
    Tier(2, "S", TIER_2, seeds=(0,), best_lr_seeds=(1,), note=TIERS[1].note),
    TIERS[2],
    Tier(4, "S", TIER_4, seeds=(0,), best_lr_seeds=(1,), note=TIERS[3].note),
    TIERS[4],
)


# ---------------------------------------------------------------------------- the claim


@dataclass(frozen=True)
class PaperModel:
    """One of the paper's Llamas: its name (about its total parameters, with a ``vocab_size``-token
    embedding and an untied LM head) and the shape of its transformer body."""

    name: str
    dim: int
    layers: int
    mlp_hidden: int
    vocab_size: int = 32000

    @property
    def body_parameters(self) -> int:
        """Parameters of the blocks (attention 4 x dim^2, SwiGLU 3 x dim x mlp_hidden, two norms)
        and the final norm: all but the embedding and the LM head."""
        return self.layers * (4 * self.dim ** 2 + 3 * self.dim * self.mlp_hidden + 2 * self.dim) + self.dim

    @property
    def parameters(self) -> int:
        return self.body_parameters + 2 * self.vocab_size * self.dim


@dataclass(frozen=True)
class PaperClaim:
    """What the paper reports, as the page checks it.

    ``relations`` are the pairwise orderings that ``ordering`` implies ("a < b": a reaches the
    lower perplexity). ``table`` holds the paper's numbers where the page shows them: its model
    size -> optimizer (this study's name) -> final validation perplexity; ``models`` the shapes of
    those sizes (the page plots the gap against size on their transformer bodies).
    """

    ordering: str
    relations: tuple[tuple[str, str], ...]
    stable_range: str
    not_reproduced: str
    table: Mapping[str, Mapping[str, float]] = field(default_factory=dict, hash=False)
    table_source: str = ""
    models: tuple[PaperModel, ...] = ()


SUBJECT = "Magma"

# The paper's Table 1: final validation perplexity of Llama on C4 (GaLore's protocol).
PAPER = PaperClaim(
    ordering="Magma-RMSProp < Magma-LaProp, Magma-Adam < RMSProp < LaProp < AdamW (at 60M and 130M parameters)",
    relations=(("Magma-Adam", "AdamW"), ("Magma-RMSProp", "RMSProp"), ("Magma-LaProp", "LaProp"),
               ("Magma-RMSProp", "Magma-Adam"), ("Magma-RMSProp", "Magma-LaProp"),
               ("RMSProp", "LaProp"), ("LaProp", "AdamW")),
    stable_range="the paper claims Adam+Magma stays effective up to lr 0.05, where Adam degrades outside "
                 "about 1e-3 to 3e-3",
    not_reproduced="Not reproduced: the paper's models (Llama with a 32K-token vocabulary at 60M and 130M "
                   "parameters), its data (C4) and its token-level perplexities. This edition keeps the "
                   "protocol (about 20 tokens per parameter, the schedule, the grid, best-lr selection, what "
                   "Magma masks) at byte level and at 11M, 29M and 50M parameters (50M: tier 5); compare "
                   "the relative differences to Adam, not the absolute perplexities. Differences smaller than "
                   "the seed ranges above are not evidence either way.",
    table={"60M": {"AdamW": 30.79, "Magma-Adam": 29.09, "LaProp": 29.98, "Magma-LaProp": 29.05,
                   "RMSProp": 29.29, "Magma-RMSProp": 28.55},
           "130M": {"AdamW": 24.77, "Magma-Adam": 22.08, "LaProp": 23.07, "Magma-LaProp": 22.16,
                    "RMSProp": 22.64, "Magma-RMSProp": 21.66}},
    table_source="arXiv 2602.15322, Table 1 (Llama on C4, batch 512 x 256 tokens, 10K steps at 60M)",
    # GaLore's configs (configs/llama_60m.json, llama_130m.json): most of 60M is its 32K-token embedding
    # and LM head; its body (25.3M) is about our M's, 130M's (85.0M) above our L's.
    models=(PaperModel("60M", dim=512, layers=8, mlp_hidden=1376),
            PaperModel("130M", dim=768, layers=12, mlp_hidden=2048)),
)

# The training recipe every optimizer shares; {betas} and {weight_decay} come from the records.
SHARED_RECIPE = (
    "Shared: betas {betas}, decoupled weight decay {weight_decay} on 2-D weights (not on the "
    "embedding or norms; AdamW decays what `magma_ext.param_groups` decays, via "
    "`magma_ext.decay_groups`); Magma masks the attention and MLP weights only (not the LM head, "
    "embedding or norms), tau 2, keep probability 0.5. The paper's schedule: linear warm-up over "
    "the first 10% of steps, then cosine decay to 10% of the peak; gradient clipping at 1.0; "
    "bfloat16 autocast and torch.compile of the model on CUDA (float32, eager on CPU). Each run "
    "reads windows of seq_len + 1 bytes at stride seq_len in a seeded random order without "
    "replacement, so no run of S or M sees a training byte twice; an L run reads more windows than "
    "its corpus holds, and once it has read every window it reads them all again in a new shuffled "
    "order (each L result says how many passes). Runs of one size and seed read the same windows in the "
    "same order whatever the optimizer. Validation: fixed windows spread over "
    "the held-out split at step 0 and every twentieth of the run; the final perplexity is "
    "measured on more windows. Perplexity is per byte, exp(val loss).")

# How the runs are laid out and judged; {shard_note} comes from the records.
DESIGN = (
    "Design (issue 13): the paper's protocol (GaLore's: Llama, 10% warm-up then cosine to 10% of the "
    "peak, learning rates 1e-4, 5e-4, 1e-3, 5e-3 and 1e-2, the final validation perplexity at the "
    "best lr), scaled to byte-level models of about 10M (S), 30M (M) and 50M (L) parameters at about 20 "
    "tokens per parameter, with 2e-2 and 5e-2 added to the grid for the robustness claim. Tier 1 (S): AdamW, "
    "Magma-Adam, RMSProp and Magma-RMSProp over the grid with seed 0, then seeds 1 and 2 at each "
    "one's best lr. Tier 2 (S): LaProp, Magma-LaProp, SkipUpdate and Muon the same way. Tier 3 (M): "
    "tier 1's four at their S-best lr and the next grid point above, seed 0. Tier 4 (S, issue 31): "
    "Magma-Adam with its moments stored in bfloat16, rounded stochastically (Magma-Adam-bf16) and, to "
    "show what that buys, to nearest (Magma-Adam-bf16-nearest), as tier 1. Tier 5 (L, issue 33): "
    "AdamW and Magma-Adam at their S-best lr, seed 0, the paper's batch of 512 x 256 tokens; M's corpus "
    "is shorter than an L run, which reads it about 1.4 times. The best learning rate of a cell "
    "minimises the mean final validation perplexity over the seeds that every learning rate of the "
    "cell ran; the extra seeds at it favour it slightly, as seed 0 picked it{shard_note}.")


# ---------------------------------------------------------------------------- the edition


@dataclass(frozen=True)
class Edition:
    """The study's protocol. ``sizes``/``tiers`` are the real study, ``quick_sizes``/``quick_tiers``
    its CPU smoke test (``--quick``: the same tiers at tiny sizes, the ``quick_lrs`` middle points
    of each grid, ``quick_optimizers`` by default). ``gap`` is the (subject, baseline) pair whose
    difference in best final perplexity the page follows across sizes, beside the paper's."""

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
    weight_decay: float = WEIGHT_DECAY
    quick_lrs: int = 2
    gap: tuple[str, str] | None = None

    def title(self) -> str:
        """The page's title: the subject against every baseline of the optimizers."""
        baselines = and_join([r.name for r in self.optimizers.values() if r.baseline])
        return f"Convergence: {SUBJECT} against {baselines} (edition {self.number})"

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


EDITION = Edition(
    number=2, sizes=SIZES, optimizers=OPTIMIZERS, tiers=TIERS, quick_sizes=QUICK_SIZES, quick_tiers=QUICK_TIERS,
    quick_optimizers=("AdamW", "Magma-Adam"), reference="AdamW", paper=PAPER, shared_recipe=SHARED_RECIPE,
    design=DESIGN, stable_within=0.05, gap=("Magma-Adam", "AdamW"))


# ---------------------------------------------------------------------------- prose helpers

_NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve")


def spelled(n: int) -> str:
    """A small count in words ("six"), larger ones in digits."""
    return _NUMBERS[n] if 0 <= n < len(_NUMBERS) else str(n)


def and_join(names: list[str]) -> str:
    """"a, b and c"."""
    return " and ".join(filter(None, [", ".join(names[:-1]), names[-1]])) if names else ""
