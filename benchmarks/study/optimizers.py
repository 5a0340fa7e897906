"""Builds the optimizer that a :class:`~.definition.Recipe` names, for one model."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from magma_ext import Magma, decay_groups, has_cuda_extension, param_groups
from magma_ext.demo.train import BETAS

from .definition import WEIGHT_DECAY, Recipe


class MuonWithAdamW(torch.optim.Optimizer):
    """``torch.optim.Muon`` for the hidden 2-D matrices and AdamW for every other parameter,
    as one optimizer.

    Its ``param_groups`` are the inner optimizers' own group dicts, so an LR scheduler that
    scales this optimizer's groups scales both inner optimizers (each from its own base lr). Its
    state dict holds both inner optimizers' (a run's checkpoint saves it).
    """

    def __init__(self, muon_params: list[torch.Tensor], adamw_groups: list[dict], *, lr: float,
                 adamw_lr: float, weight_decay: float, adamw_fused: bool | None):
        self.muon = torch.optim.Muon(muon_params, lr=lr, weight_decay=weight_decay)
        self.adamw = torch.optim.AdamW(adamw_groups, lr=adamw_lr, betas=BETAS, fused=adamw_fused)
        self.optimizers = (self.muon, self.adamw)
        super().__init__(self.muon.param_groups + self.adamw.param_groups, {})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for optimizer in self.optimizers:
            optimizer.step()
        return loss

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])
        # Loading replaces the inner optimizers' group dicts: share the new ones again.
        self.param_groups = self.muon.param_groups + self.adamw.param_groups


def muon_split(model: nn.Module, weight_decay: float = WEIGHT_DECAY) -> tuple[list[torch.Tensor], list[dict]]:
    """(Muon's parameters, AdamW's groups): Muon takes the 2-D weights of the hidden
    ``nn.Linear`` layers; the embedding, the LM head and the norms go to AdamW with the
    demo's decay rule."""
    head = getattr(model, "lm_head", None)
    hidden = [m.weight for m in model.modules()
              if isinstance(m, nn.Linear) and m is not head and m.weight.ndim == 2]
    hidden_ids = {id(p) for p in hidden}
    adamw_groups = []
    for group in decay_groups(model, weight_decay):
        rest = [p for p in group["params"] if id(p) not in hidden_ids]
        if rest:
            adamw_groups.append({**group, "params": rest})
    return hidden, adamw_groups


def magma_fused_flag(device: torch.device) -> bool | None:
    """``fused=True`` on CUDA when the extension is built (fail rather than fall back
    silently), else None: the reference path."""
    return True if device.type == "cuda" and has_cuda_extension() else None


def runs_magma_fused(recipe: Recipe, device: torch.device) -> bool:
    """Whether this recipe's step takes magma_ext's fused CUDA path on ``device`` (records' ``magma_fused``)."""
    return bool(recipe.uses_magma and magma_fused_flag(device))


def _torch_fused(device: torch.device) -> bool | None:
    return True if device.type == "cuda" else None


def build_adamw(model, lr, seed, device, weight_decay):
    return torch.optim.AdamW(decay_groups(model, weight_decay), lr=lr, betas=BETAS, fused=_torch_fused(device))


def round_moments_to_nearest_bfloat16(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """Step post-hook: every float32 moment rounded to the nearest bfloat16, in place."""
    moments = [state[key] for state in optimizer.state.values() for key in ("exp_avg", "exp_avg_sq")
               if key in state]
    if moments:
        with torch.no_grad():
            torch._foreach_copy_(moments, [m.to(torch.bfloat16) for m in moments])


def build_magma(model, lr, seed, device, weight_decay, *, base: str, mask: str, keep_prob: float,
                tau: float | None = None, state_dtype: str = "float32", state_rounding: str = "stochastic"):
    """Magma over ``param_groups(model)``. ``state_dtype`` "bfloat16" stores the moments in
    bfloat16 (Magma's stochastic rounding); with ``state_rounding`` "nearest" they stay float32
    and are rounded to the nearest bfloat16 after every step instead (the study's emulation of
    round-to-nearest bfloat16 state: the moments carried between steps are exactly that state's,
    but each step's update reads them before the rounding)."""
    extra = {} if tau is None else {"tau": tau}  # masks other than "magma" compute no score
    if state_dtype not in ("float32", "bfloat16") or state_rounding not in ("stochastic", "nearest"):
        raise ValueError(f"state_dtype {state_dtype!r} / state_rounding {state_rounding!r}: expected "
                         "'float32' or 'bfloat16' / 'stochastic' or 'nearest'")
    if state_dtype == "bfloat16" and state_rounding == "stochastic":
        extra |= {"exp_avg_dtype": torch.bfloat16, "exp_avg_sq_dtype": torch.bfloat16}
    optimizer = Magma(param_groups(model, weight_decay=weight_decay), lr=lr, betas=BETAS, base=base,
                      mask=mask, keep_prob=keep_prob, seed=seed, fused=magma_fused_flag(device), **extra)
    if state_dtype == "bfloat16" and state_rounding == "nearest":
        optimizer.register_step_post_hook(round_moments_to_nearest_bfloat16)
    return optimizer


def build_muon(model, lr, seed, device, weight_decay, *, adamw_lr_ratio: float):
    if not hasattr(torch.optim, "Muon"):
        raise RuntimeError(f"torch {torch.__version__} has no torch.optim.Muon")
    hidden, adamw_groups = muon_split(model, weight_decay)
    return MuonWithAdamW(hidden, adamw_groups, lr=lr, adamw_lr=lr * adamw_lr_ratio,
                         weight_decay=weight_decay, adamw_fused=_torch_fused(device))


BUILDERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw": build_adamw, "magma": build_magma, "muon": build_muon}


def build(recipe: Recipe, model: nn.Module, lr: float, seed: int, device: torch.device,
          weight_decay: float = WEIGHT_DECAY) -> torch.optim.Optimizer:
    """The recipe's optimizer over ``model``'s parameters."""
    return BUILDERS[recipe.builder](model, lr, seed, device, weight_decay, **recipe.options)
