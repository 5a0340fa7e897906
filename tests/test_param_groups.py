"""magma_ext.param_groups / decay_groups / split_parameters: which parameters are masked and decayed.

The rule (issue 9, after the paper's Table A1): attention and MLP weights are masked and decayed;
the output layer and other non-Linear weights are decayed but not masked; embeddings, norms and
1-D parameters are neither.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import magma_ext
from magma_ext import Magma, decay_groups, param_groups
from magma_ext.demo.model import Llama, LlamaConfig
from magma_ext.param_groups import HEAD_NAMES, split_parameters


# ---------------------------------------------------------------------------------------------
# Helpers (local to this module on purpose: nothing is imported from conftest)
# ---------------------------------------------------------------------------------------------

class CustomNorm(nn.Module):
    """A norm the helper cannot know by type: only its class name says "Norm"."""

    def __init__(self, width):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(2, width))  # 2-D on purpose

    def forward(self, x):
        return x * self.weight[0] + self.weight[1]


class TinyLM(nn.Module):
    def __init__(self, vocab=11, width=8, tie=False):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.norm_in = nn.LayerNorm(width)
        self.up = nn.Linear(width, 2 * width)  # with bias
        self.down = nn.Linear(2 * width, width, bias=False)
        self.conv = nn.Conv1d(width, width, kernel_size=3, padding=1)
        self.norm_out = nn.RMSNorm(width)
        self.custom = CustomNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.frozen = nn.Linear(width, width)
        self.frozen.requires_grad_(False)
        if tie:
            self.head.weight = self.embed.weight

    def forward(self, tokens):
        x = self.norm_in(self.embed(tokens))
        x = x + self.down(torch.relu(self.up(x)))
        x = x + self.conv(x.transpose(1, 2)).transpose(1, 2)
        return self.head(self.custom(self.norm_out(x)))


class Conv1D(nn.Module):
    """A stand-in for Hugging Face's ``transformers.pytorch_utils.Conv1D``: a Linear whose weight
    is stored (in, out), with ``nf`` outputs."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


class GPT2Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Named(("c_attn", Conv1D(3 * width, width)), ("c_proj", Conv1D(width, width)))
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = Named(("c_fc", Conv1D(4 * width, width)), ("c_proj", Conv1D(width, 4 * width)))

    def forward(self, x):
        q, _, v = self.attn.c_attn(self.ln_1(x)).chunk(3, dim=-1)
        x = x + self.attn.c_proj(torch.sigmoid(q) * v)
        return x + self.mlp.c_proj(torch.relu(self.mlp.c_fc(self.ln_2(x))))


class TinyGPT2(nn.Module):
    """The module layout of Hugging Face's GPT2LMHeadModel: Conv1D layers, LM head tied to wte."""

    def __init__(self, vocab=11, width=8, n_layers=2, tie=True):
        super().__init__()
        self.transformer = Named(("wte", nn.Embedding(vocab, width)), ("wpe", nn.Embedding(16, width)),
                                 ("h", nn.ModuleList(GPT2Block(width) for _ in range(n_layers))),
                                 ("ln_f", nn.LayerNorm(width)))
        self.lm_head = nn.Linear(width, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.transformer.wte.weight

    def forward(self, tokens):
        t = self.transformer
        x = t.wte(tokens) + t.wpe(torch.arange(tokens.shape[-1]))
        for block in t.h:
            x = block(x)
        return self.lm_head(t.ln_f(x))


def _gpt2_expected(n_layers=2):
    masked = {f"transformer.h.{i}.{w}.weight" for i in range(n_layers)
              for w in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    plain = ({"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight",
              "transformer.ln_f.bias"}
             | {f"transformer.h.{i}.{w}.bias" for i in range(n_layers)
                for w in ("ln_1", "ln_2", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
             | {f"transformer.h.{i}.{n}.weight" for i in range(n_layers) for n in ("ln_1", "ln_2")})
    return masked, plain


class Named(nn.Module):
    """Submodules given as (attribute name, module) pairs, registered in that order."""

    def __init__(self, *children):
        super().__init__()
        for name, module in children:
            self.add_module(name, module)


def _names(model, params):
    """Names of ``params`` (tensors, or param_groups' (name, tensor) pairs, whose names must be
    the model's)."""
    by_id = {id(p): name for name, p in model.named_parameters()}
    for entry in params:
        if isinstance(entry, tuple):
            assert entry[0] == by_id[id(entry[1])]
    return [by_id[id(p)] for p in _tensors(params)]


def _tensors(params):
    """The tensors of a group's params, without the names param_groups gives them."""
    return [entry[1] if isinstance(entry, tuple) else entry for entry in params]


def _split_names(model, **kwargs):
    """(masked, unmasked_decayed, plain) as sets of parameter names."""
    return tuple(set(_names(model, params)) for params in split_parameters(model, **kwargs))


def _by_kind(model, groups):
    """Names per kind of param_groups group: masked, unmasked but decayed, plain."""
    out = {"masked": [], "unmasked_decayed": [], "plain": []}
    for g in groups:
        if g.get("magma", True) is not False:
            kind = "masked"
        else:
            kind = "unmasked_decayed" if g["weight_decay"] != 0.0 else "plain"
        out[kind] += _names(model, g["params"])
    return out


def _llama(dim=32, n_layers=2, n_heads=2, vocab_size=256):
    torch.manual_seed(0)
    return Llama(LlamaConfig(vocab_size=vocab_size, dim=dim, n_layers=n_layers, n_heads=n_heads,
                             max_seq_len=16))


def _llama_expected(n_layers):
    masked = {f"blocks.{i}.{w}.weight" for i in range(n_layers)
              for w in ("attn.wq", "attn.wk", "attn.wv", "attn.wo", "mlp.w1", "mlp.w2", "mlp.w3")}
    plain = {"embed.weight", "norm.weight"} | {f"blocks.{i}.{n}.weight" for i in range(n_layers)
                                              for n in ("attn_norm", "mlp_norm")}
    return masked, {"lm_head.weight"}, plain


# ---------------------------------------------------------------------------------------------
# The rule on the demo's Llama
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dim", [32, 96, 256],
                         ids=["dim32", "dim96-mlp-width-is-vocab", "dim256-attention-width-is-vocab"])
def test_llama_split(dim):
    """Attention and MLP projections masked, LM head decayed only, embedding and norms plain;
    also when a hidden width equals the byte vocabulary (256), which must not make a hidden
    layer look like the output layer."""
    model = _llama(dim=dim, n_heads=4)
    assert _split_names(model) == _llama_expected(2)


def test_llama_param_groups_layout():
    model = _llama()
    groups = param_groups(model, weight_decay=0.1, lr=3e-4)
    masked, unmasked_decayed, plain = _llama_expected(2)
    assert [set(names) for names in _by_kind(model, groups).values()] == [masked, unmasked_decayed, plain]
    assert [(g["weight_decay"], g.get("magma", True), g["lr"]) for g in groups] == [
        (0.1, True, 3e-4), (0.1, False, 3e-4), (0.0, False, 3e-4)]


@pytest.mark.parametrize("make", [_llama,
                                  lambda: Named(("stem", nn.Conv1d(4, 4, 3)), ("proj", nn.Linear(4, 4)))],
                         ids=["llama", "unmasked-weight-first"])
def test_lists_follow_model_order(make):
    model = make()
    order = [name for name, _ in model.named_parameters()]
    for params in split_parameters(model):
        names = _names(model, params)
        assert names == sorted(names, key=order.index)
    for group in decay_groups(model, 0.1):
        names = _names(model, group["params"])
        assert names == sorted(names, key=order.index)


# ---------------------------------------------------------------------------------------------
# The rule on other layouts
# ---------------------------------------------------------------------------------------------

EXPECTED_MASKED = {"up.weight", "down.weight"}
EXPECTED_UNMASKED_DECAYED = {"conv.weight", "head.weight"}  # not a Linear; the output layer
EXPECTED_PLAIN = {"embed.weight", "norm_in.weight", "norm_in.bias", "up.bias", "conv.bias",
                  "norm_out.weight", "custom.weight"}


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_membership_and_options(weight_decay):
    model = TinyLM()
    groups = param_groups(model, weight_decay=weight_decay)
    masked = [g for g in groups if g.get("magma", True) is not False]
    unmasked = [g for g in groups if g.get("magma", True) is False]
    assert {n for g in masked for n in _names(model, g["params"])} == EXPECTED_MASKED
    assert ({n for g in unmasked for n in _names(model, g["params"])}
            == EXPECTED_UNMASKED_DECAYED | EXPECTED_PLAIN)
    assert all(g["weight_decay"] == weight_decay for g in masked)
    assert _split_names(model) == (EXPECTED_MASKED, EXPECTED_UNMASKED_DECAYED, EXPECTED_PLAIN)
    decays = {n: g["weight_decay"] for g in groups for n in _names(model, g["params"])}
    assert {n for n, wd in decays.items() if n in EXPECTED_UNMASKED_DECAYED} == EXPECTED_UNMASKED_DECAYED
    assert all(decays[n] == weight_decay for n in EXPECTED_UNMASKED_DECAYED)
    assert all(decays[n] == 0.0 for n in EXPECTED_PLAIN)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied-embedding"])
def test_every_trainable_parameter_exactly_once(tie):
    model = TinyLM(tie=tie)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for listed in ([p for g in param_groups(model, weight_decay=0.1) for p in _tensors(g["params"])],
                   [p for g in decay_groups(model, 0.1) for p in g["params"]],
                   [p for params in split_parameters(model) for p in params]):
        assert len(listed) == len({id(p) for p in listed})
        assert {id(p) for p in listed} == {id(p) for p in trainable}


def test_tied_head_is_the_embedding():
    """A head tied to the embedding is one tensor, plain (an embedding). Being tied also makes
    it the output layer, so a later hidden layer as wide as the vocabulary stays masked."""
    embed = nn.Embedding(12, 8)
    unembed = nn.Linear(8, 12, bias=False)
    unembed.weight = embed.weight
    model = Named(("embed", embed), ("unembed", unembed),
                  ("up", nn.Linear(8, 12, bias=False)), ("down", nn.Linear(12, 8, bias=False)))
    assert _split_names(model) == ({"up.weight", "down.weight"}, set(), {"embed.weight"})


@pytest.mark.parametrize("head_name", sorted(HEAD_NAMES))
def test_head_name_rule(head_name):
    """A Linear called like a head is the output layer, whatever its width; no embedding needed."""
    model = Named(("body", nn.Linear(6, 6, bias=False)), (head_name, nn.Linear(6, 3, bias=False)))
    assert _split_names(model) == ({"body.weight"}, {f"{head_name}.weight"}, set())


def test_head_name_is_the_attribute_name_only():
    """Only the Linear's own attribute name counts: the dense layer inside a module called
    ``output`` (BERT's ``attention.output.dense``) is a hidden layer; so is ``heads``."""
    output = Named(("dense", nn.Linear(6, 6, bias=False)))
    model = Named(("output", output), ("heads", nn.Linear(6, 6, bias=False)),
                  ("lm_head", nn.Linear(6, 9, bias=False)))
    assert _split_names(model) == ({"output.dense.weight", "heads.weight"}, {"lm_head.weight"}, set())


def test_head_name_under_an_alias():
    """A Linear registered twice counts as the head if either of its names is a head name."""
    proj = nn.Linear(6, 6, bias=False)
    model = Named(("proj", proj), ("hidden", nn.Linear(6, 6, bias=False)), ("output", proj))
    assert _split_names(model) == ({"hidden.weight"}, {"proj.weight"}, set())


def test_vocab_size_rule():
    """Without a tie or a head name, the last Linear that projects onto an embedding's
    vocabulary is the output layer; an earlier layer of that width is a hidden layer."""
    model = Named(("tok", nn.Embedding(12, 8)), ("wide", nn.Linear(8, 12, bias=False)),
                  ("narrow", nn.Linear(12, 8, bias=False)), ("unembed", nn.Linear(8, 12, bias=False)))
    assert _split_names(model) == ({"wide.weight", "narrow.weight"}, {"unembed.weight"}, {"tok.weight"})


def test_vocab_size_rule_needs_an_embedding():
    model = Named(("a", nn.Linear(8, 12, bias=False)), ("b", nn.Linear(12, 12, bias=False)))
    assert _split_names(model) == ({"a.weight", "b.weight"}, set(), set())


def test_vocab_size_rule_is_a_fallback():
    """When a head name identifies the output layer, a later vocabulary-wide Linear stays masked."""
    model = Named(("tok", nn.Embedding(12, 8)), ("lm_head", nn.Linear(8, 12, bias=False)),
                  ("aux", nn.Linear(8, 12, bias=False)))
    assert _split_names(model) == ({"aux.weight"}, {"lm_head.weight"}, {"tok.weight"})


def test_multihead_attention_weights_are_masked():
    """nn.MultiheadAttention holds its input projections directly; they are attention weights."""
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16)
    masked, unmasked_decayed, plain = _split_names(layer)
    assert masked == {"self_attn.in_proj_weight", "self_attn.out_proj.weight", "linear1.weight",
                      "linear2.weight"}
    assert unmasked_decayed == set()
    assert plain == {"self_attn.in_proj_bias", "self_attn.out_proj.bias", "linear1.bias", "linear2.bias",
                     "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias"}

    separate = nn.MultiheadAttention(8, 2, kdim=6, vdim=5, bias=False)
    assert _split_names(separate) == (
        {"q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight"}, set(), set())


@pytest.mark.parametrize("tie", [True, False], ids=["tied-head", "untied-head"])
def test_hugging_face_conv1d_is_a_linear(tie):
    """GPT-2's attention and MLP layers are Conv1D (weight (in, out)): masked like Linears. Its
    head is tied to wte (plain, an embedding) or, untied, called lm_head (decayed only)."""
    model = TinyGPT2(tie=tie)
    masked, plain = _gpt2_expected()
    head = set() if tie else {"lm_head.weight"}
    assert _split_names(model) == (masked, head, plain)


def test_conv1d_as_output_layer():
    """The output-layer rules count a Conv1D's outputs (nf): by name, and by vocabulary size."""
    by_name = Named(("body", Conv1D(6, 6)), ("lm_head", Conv1D(3, 6)))
    assert _split_names(by_name)[:2] == ({"body.weight"}, {"lm_head.weight"})
    by_vocab = Named(("tok", nn.Embedding(12, 8)), ("wide", Conv1D(12, 8)), ("narrow", Conv1D(8, 12)),
                     ("unembed", Conv1D(12, 8)))
    assert _split_names(by_vocab)[:2] == ({"wide.weight", "narrow.weight"}, {"unembed.weight"})


def test_conv1d_is_recognised_by_name_and_layout():
    """Only a class named Conv1D whose 2-D weight has nf columns is a Linear: torch's Conv1d, a
    Conv1D without nf, or one whose nf does not match its weight stays unmasked."""
    no_nf = Conv1D(4, 4)
    del no_nf.nf
    wrong_nf = Conv1D(4, 6)
    wrong_nf.nf = 6
    model = Named(("conv", nn.Conv1d(4, 4, 3, bias=False)), ("no_nf", no_nf), ("wrong_nf", wrong_nf),
                  ("real", Conv1D(4, 4)))
    assert _split_names(model)[:2] == ({"real.weight"},
                                       {"conv.weight", "no_nf.weight", "wrong_nf.weight"})


def test_gpt2_groups_train_with_magma():
    """The Conv1D weights are masked in training: their scores move; the tied head's do not."""
    torch.manual_seed(0)
    model = TinyGPT2()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a model with masked weights gives no warning
        groups = param_groups(model, weight_decay=0.1)
    optimizer = Magma(groups, lr=0.01, keep_prob=0.5)
    tokens = torch.randint(0, 11, (2, 5))
    for _ in range(3):
        optimizer.zero_grad()
        model(tokens).logsumexp(-1).mean().backward()
        optimizer.step()
    params = dict(model.named_parameters())
    masked, _ = _gpt2_expected()
    assert all(not bool((optimizer.state[params[n]]["magma_score"] == 0.5).all()) for n in masked)
    assert bool((optimizer.state[params["transformer.wte.weight"]]["magma_score"] == 0.5).all())


@pytest.mark.parametrize("make,masked,says", [
    (lambda: Named(("norm", nn.LayerNorm(4)), ("conv", nn.Conv1d(4, 4, 3))), None, "default rule"),
    (lambda: Named(("tok", nn.Embedding(9, 4)), ("lm_head", nn.Linear(4, 9))), None, "default rule"),
    (_llama, lambda name, param: False, "masked= chose none"),
], ids=["no-linear", "only-a-head", "predicate-masks-nothing"])
def test_warns_when_nothing_is_masked(make, masked, says):
    """Magma over such groups is its base optimizer alone: say so once, naming masked=."""
    with pytest.warns(UserWarning) as record:
        param_groups(make(), weight_decay=0.1, masked=masked)
    assert len(record) == 1
    message = str(record[0].message)
    assert "masked=" in message and says in message and "no parameter" in message


@pytest.mark.parametrize("call", [
    lambda m: param_groups(m.parameters()),
    lambda m: param_groups(list(m.parameters()), weight_decay=0.1),
    lambda m: decay_groups(m.parameters(), 0.1),
    lambda m: split_parameters(dict(m.named_parameters())),
], ids=["param_groups-generator", "param_groups-list", "decay_groups-generator", "split_parameters-dict"])
def test_parameters_instead_of_model_raise_type_error(call):
    with pytest.raises(TypeError, match=r"nn\.Module.*model\.parameters\(\)"):
        call(_llama())


def test_frozen_parameters_are_left_out():
    model = _llama()
    model.lm_head.requires_grad_(False)
    model.embed.requires_grad_(False)
    masked, unmasked_decayed, plain = _llama_expected(2)
    assert _split_names(model) == (masked, set(), plain - {"embed.weight"})


# ---------------------------------------------------------------------------------------------
# The override
# ---------------------------------------------------------------------------------------------

def test_masked_predicate_replaces_the_rule():
    model = _llama()
    masked, unmasked_decayed, plain = _llama_expected(2)
    decayed = masked | unmasked_decayed
    calls = []

    def first_block_and_head(name, param):
        calls.append((name, param))
        return name.startswith("blocks.0.") or name == "lm_head.weight"

    chosen = {n for n in decayed if n.startswith("blocks.0.")} | {"lm_head.weight"}
    groups = param_groups(model, weight_decay=0.1, masked=first_block_and_head)
    by_kind = _by_kind(model, groups)
    assert set(by_kind["masked"]) == chosen
    assert set(by_kind["unmasked_decayed"]) == decayed - chosen
    assert set(by_kind["plain"]) == plain
    # Asked once about each decayed parameter, by its name, with the tensor itself.
    params = dict(model.named_parameters())
    assert sorted(name for name, _ in calls) == sorted(decayed)
    assert all(param is params[name] for name, param in calls)


def test_masked_predicate_cannot_mask_plain_parameters():
    """Masking "everything" masks every decayed weight (the paper's all-layers ablation);
    embeddings and norms stay plain and undecayed."""
    model = _llama()
    masked, unmasked_decayed, plain = _llama_expected(2)
    assert _split_names(model, masked=lambda name, param: True) == (masked | unmasked_decayed, set(), plain)
    assert _split_names(model, masked=lambda name, param: False) == (set(), masked | unmasked_decayed, plain)


@pytest.mark.parametrize("bad", ["lm_head", 1, ["blocks.0"], True])
def test_bad_masked_raises_type_error(bad):
    model = _llama()
    with pytest.raises(TypeError, match="masked"):
        param_groups(model, weight_decay=0.1, masked=bad)
    with pytest.raises(TypeError, match="masked"):
        split_parameters(model, masked=bad)


# ---------------------------------------------------------------------------------------------
# decay_groups: the AdamW view of the same split
# ---------------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:param_groups. no parameter")  # "w1" masks none of some models
@pytest.mark.parametrize("make", [_llama, TinyLM, lambda: TinyLM(tie=True),
                                  lambda: nn.TransformerEncoderLayer(8, 2, 16)],
                         ids=["llama", "tinylm", "tinylm-tied", "transformer-layer"])
def test_decay_groups_agree_with_param_groups(make):
    model = make()
    groups = decay_groups(model, 0.1, lr=1e-3)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert all(g["lr"] == 1e-3 and "magma" not in g for g in groups)
    decayed, plain = ({id(p) for p in g["params"]} for g in groups)
    for masked_rule in (None, lambda name, param: "w1" in name):
        magma = param_groups(model, weight_decay=0.1, masked=masked_rule)
        assert {id(p) for g in magma if g["weight_decay"] == 0.1 for p in _tensors(g["params"])} == decayed
        assert {id(p) for g in magma if g["weight_decay"] == 0.0 for p in _tensors(g["params"])} == plain
    masked, unmasked_decayed, plain_list = split_parameters(model)
    assert decayed == {id(p) for p in masked + unmasked_decayed}
    assert plain == {id(p) for p in plain_list}


def test_decay_groups_on_llama():
    model = _llama()
    masked, unmasked_decayed, plain = _llama_expected(2)
    decayed_group, plain_group = decay_groups(model, 0.1)
    assert set(_names(model, decayed_group["params"])) == masked | unmasked_decayed
    assert set(_names(model, plain_group["params"])) == plain


def test_empty_groups_are_omitted():
    only_matrices = Named(("a", nn.Linear(4, 4, bias=False)))
    assert [len(g["params"]) for g in param_groups(only_matrices)] == [1]
    assert [g["weight_decay"] for g in decay_groups(only_matrices, 0.1)] == [0.1]
    only_norms = Named(("norm", nn.LayerNorm(4)))
    with pytest.warns(UserWarning, match="no parameter"):
        assert [(len(g["params"]), g["magma"]) for g in param_groups(only_norms)] == [(2, False)]
    assert [g["weight_decay"] for g in decay_groups(only_norms, 0.1)] == [0.0]


# ---------------------------------------------------------------------------------------------
# The groups in use
# ---------------------------------------------------------------------------------------------

def test_default_weight_decay_is_zero():
    assert all(g["weight_decay"] == 0.0 for g in param_groups(TinyLM()))


def test_groups_train_with_magma():
    """The groups plug into Magma; unmasked params (head, conv, embeddings, norms, biases) all
    move at every step (mask "none"), masked ones keep a moving score, nothing is NaN."""
    torch.manual_seed(0)
    model = TinyLM()
    groups = param_groups(model, weight_decay=0.1)
    optimizer = Magma(groups, lr=0.01, keep_prob=0.5, block="row")
    unmasked = [p for g in groups if g.get("magma", True) is False for p in _tensors(g["params"])]
    assert set(_names(model, unmasked)) == EXPECTED_UNMASKED_DECAYED | EXPECTED_PLAIN
    tokens = torch.randint(0, 11, (2, 5))
    checked = []
    for _ in range(3):
        before = [p.detach().clone() for p in unmasked]
        optimizer.zero_grad()
        model(tokens).logsumexp(-1).mean().backward()
        optimizer.step()
        for name, p, old in zip(_names(model, unmasked), unmasked, before):
            if p.grad is not None and bool((p.grad != 0).all()):  # embedding rows of unseen tokens get 0
                assert bool((p.detach() != old).all()), name
                checked.append(name)
    assert len(checked) >= 3 * 6
    assert checked.count("head.weight") == checked.count("conv.weight") == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(bool((optimizer.state[p]["magma_score"] == 0.5).all()) for p in unmasked if optimizer.state[p])
    masked = [p for g in groups if g.get("magma", True) is not False for p in _tensors(g["params"])]
    assert all(not bool((optimizer.state[p]["magma_score"] == 0.5).all()) for p in masked)


def test_param_groups_name_their_parameters_so_masks_follow_names():
    model = _llama()
    optimizer = Magma(param_groups(model, weight_decay=0.1))
    optimizer.init_state()
    for name, p in model.named_parameters():
        assert optimizer.state[p]["magma_tensor_index"] == magma_ext.name_index(name), name
