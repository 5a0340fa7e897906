"""The compiled CUDA extension ``magma_ext._C``: its loader and its ops' typed wrappers.

Importing ``_C`` runs its static ``TORCH_LIBRARY`` registrations; the ops then live under
``torch.ops.magma_ext``.  Without the extension (a CPU-only install) this module still imports
and the package runs its PyTorch path; the fake (meta) versions of the ops, for
``torch.compile`` and ``opcheck``, are registered only when the extension is loaded.

The three ops take the same leading arguments:

``params, grads, exp_avgs, exp_avg_sqs, scores, master_params, steps``
    lists of CUDA tensors, entry ``i`` of each belonging to piece ``i``: contiguous parameters
    of one dtype (float32, bfloat16 or float16), gradients of one dtype (float32 or the
    parameters'), moments (``exp_avgs`` of one dtype, ``exp_avg_sqs`` of one dtype, each float32
    or bfloat16: a bfloat16 moment is rounded stochastically from the rounding stream keyed by
    the seed, tensor index, element offset and step, docs/ALGORITHM.md section 6), float32
    scores (one per block), ``master_params`` (float32; an empty list without master weights)
    and one-element float32 step counts that already hold this step's count (the caller
    increments them before the step and subtracts ``found_inf`` after).
``tensor_indices, block_sizes, offsets, logical_numels``
    per piece: its logical tensor's index (< 2**62), block size, the piece's element offset in
    its logical tensor and that tensor's size (docs/ALGORITHM.md section 3); the size negated
    for a piece of a column slice (``Piece.split``), whose blocks continue in the other slices
    and so always take the two-pass route through ``block_sums`` (such a piece takes float32
    moments only: its elements have no contiguous logical indices to key the rounding with).
``lr, beta1, beta2, eps, weight_decay, base, mask, keep_prob, tau, score_ema, seed``
    the hyperparameters; ``lr`` is a float or a one-element tensor, ``base`` is "adam",
    "rmsprop" or "laprop", ``mask`` "magma", "skip" or "none", ``seed`` an int in [0, 2**64).
``grad_scale, found_inf``
    optional one-element tensors: grads are divided by ``grad_scale``; where ``found_inf > 0``
    the ops write nothing at all (decided on the device: no host synchronisation).
"""

from __future__ import annotations

import importlib

import torch

from .philox import check_seed

FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_loaded: bool | None = None
_error: str = ""


def _load() -> bool:
    global _loaded, _error
    if _loaded is None:
        try:
            importlib.import_module("magma_ext._C")
            _loaded = True
        except ImportError as exc:  # not built: a CPU-only install
            _loaded, _error = False, f"import magma_ext._C failed: {exc}"
    return _loaded


def has_cuda_extension() -> bool:
    """True when magma_ext's compiled CUDA ops are loaded."""
    return _load()


def load_error() -> str:
    """Why the extension is not loaded ('' when it is)."""
    _load()
    return _error


# ---------------------------------------------------------------------------- op wrappers


def _signed64(seed: int) -> int:
    """The op schema's ``int`` is int64: pass the unsigned seed's bits."""
    seed = check_seed(seed)
    return seed - 2**64 if seed >= 2**63 else seed


def _lr_args(lr, params) -> tuple[float, torch.Tensor | None]:
    """The schema's ``(float lr, Tensor? lr_tensor)`` from a float or a one-element tensor."""
    if isinstance(lr, torch.Tensor):
        device = params[0].device if params else lr.device
        return 0.0, lr.to(device=device, dtype=torch.float32)
    return float(lr), None


def _args(params, grads, exp_avgs, exp_avg_sqs, scores, master_params, steps, tensor_indices,
          block_sizes, offsets, logical_numels, lr, beta1, beta2, eps, weight_decay, base, mask,
          keep_prob, tau, score_ema, seed, grad_scale, found_inf) -> tuple:
    """The shared leading arguments in schema order."""
    lr, lr_tensor = _lr_args(lr, params)
    return (params, grads, exp_avgs, exp_avg_sqs, scores, master_params, steps,
            tensor_indices, block_sizes, offsets, logical_numels, lr, lr_tensor,
            beta1, beta2, eps, weight_decay, base, mask, keep_prob, tau, score_ema,
            _signed64(seed), grad_scale, found_inf)


def fused_step(
    params, grads, exp_avgs, exp_avg_sqs, scores, master_params, steps,
    tensor_indices, block_sizes, offsets, logical_numels, *,
    lr, beta1, beta2, eps, weight_decay, base, mask, keep_prob, tau, score_ema, seed,
    grad_scale=None, found_inf=None,
) -> None:
    """One whole Magma step over lists of CUDA tensors, in place (``magma_ext::fused_step``).

    Writes params, exp_avgs, exp_avg_sqs, scores (mask "magma" only) and master_params.  A
    piece's blocks are scored from the piece's own elements: for pieces of blocks shared with
    other ranks, use :func:`moments_partials` and :func:`finalize_apply` instead.
    """
    torch.ops.magma_ext.fused_step(*_args(
        params, grads, exp_avgs, exp_avg_sqs, scores, master_params, steps, tensor_indices,
        block_sizes, offsets, logical_numels, lr, beta1, beta2, eps, weight_decay, base, mask,
        keep_prob, tau, score_ema, seed, grad_scale, found_inf))


def moments_partials(
    params, grads, exp_avgs, exp_avg_sqs, scores, master_params, steps,
    tensor_indices, block_sizes, offsets, logical_numels, block_sums, *,
    lr, beta1, beta2, eps, weight_decay, base, mask, keep_prob, tau, score_ema, seed,
    grad_scale=None, found_inf=None,
) -> None:
    """The first half of a step (``magma_ext::moments_partials``); :func:`finalize_apply` ends it.

    Masks "none" and "skip": the whole step; ``block_sums`` is not touched (pass a (0, 3)
    tensor).  Mask "magma": every piece's moments, and its blocks' partial sums written to
    ``block_sums``, a contiguous float32 tensor of shape (B, 3) on the params' device, B =
    ``sum(s.numel() for s in scores)``: one row per block of each piece, in list order (piece
    0's blocks, then piece 1's, ...), row b = (<m, g>, ||m||^2, ||g||^2) over this piece's
    elements of block b, with m the first moment after this step's update and g the unscaled
    gradient.  Every row is written.  A piece whose blocks lie wholly inside it (it starts on a
    block boundary and ends on one or at its logical tensor's end) of at most 8192 elements
    each takes the single-pass kernel: its whole step (score, mask, update) is done here.

    Between the halves the caller may sum the rows of blocks shared by pieces on several ranks
    (an all-reduce); then every piece of a block computes the same score.
    """
    torch.ops.magma_ext.moments_partials(*_args(
        params, grads, exp_avgs, exp_avg_sqs, scores, master_params, steps, tensor_indices,
        block_sizes, offsets, logical_numels, lr, beta1, beta2, eps, weight_decay, base, mask,
        keep_prob, tau, score_ema, seed, grad_scale, found_inf), block_sums)


def finalize_apply(
    params, grads, exp_avgs, exp_avg_sqs, scores, master_params, steps,
    tensor_indices, block_sizes, offsets, logical_numels, block_sums, *,
    lr, beta1, beta2, eps, weight_decay, base, mask, keep_prob, tau, score_ema, seed,
    grad_scale=None, found_inf=None,
) -> None:
    """The second half of a step begun by :func:`moments_partials` (``magma_ext::finalize_apply``).

    Mask "magma": for every piece that :func:`moments_partials` did not finish, reads its rows
    of ``block_sums`` (same layout; possibly all-reduced since), updates the scores, draws the
    masks and applies the update to kept blocks.  Writes params, scores and master_params only.
    Masks "none" and "skip": nothing to do.  Pass the same arguments as to moments_partials.
    """
    torch.ops.magma_ext.finalize_apply(*_args(
        params, grads, exp_avgs, exp_avg_sqs, scores, master_params, steps, tensor_indices,
        block_sizes, offsets, logical_numels, lr, beta1, beta2, eps, weight_decay, base, mask,
        keep_prob, tau, score_ema, seed, grad_scale, found_inf), block_sums)


# ---------------------------------------------------------------------------- fake versions

if has_cuda_extension():

    @torch.library.register_fake("magma_ext::fused_step")
    def _fused_step_fake(params, grads, exp_avgs, exp_avg_sqs, scores, master_params, steps,
                         tensor_indices, block_sizes, offsets, logical_numels, lr, lr_tensor,
                         beta1, beta2, eps, weight_decay, base, mask, keep_prob, tau, score_ema,
                         seed, grad_scale, found_inf) -> None:
        return None

    def _check_block_sums_fake(scores, mask, block_sums) -> None:
        """Mask "magma": block_sums has one row of three sums per block of ``scores``."""
        if mask == "magma":
            rows = sum(s.numel() for s in scores)
            message = lambda: f"block_sums must have shape ({rows}, 3), got {tuple(block_sums.shape)}"  # noqa: E731
            torch._check(block_sums.dim() == 2, message)
            torch._check(block_sums.shape[0] == rows, message)
            torch._check(block_sums.shape[1] == 3, message)

    @torch.library.register_fake("magma_ext::moments_partials")
    def _moments_partials_fake(params, grads, exp_avgs, exp_avg_sqs, scores, master_params, steps,
                               tensor_indices, block_sizes, offsets, logical_numels, lr, lr_tensor,
                               beta1, beta2, eps, weight_decay, base, mask, keep_prob, tau,
                               score_ema, seed, grad_scale, found_inf, block_sums) -> None:
        _check_block_sums_fake(scores, mask, block_sums)

    @torch.library.register_fake("magma_ext::finalize_apply")
    def _finalize_apply_fake(params, grads, exp_avgs, exp_avg_sqs, scores, master_params, steps,
                             tensor_indices, block_sizes, offsets, logical_numels, lr, lr_tensor,
                             beta1, beta2, eps, weight_decay, base, mask, keep_prob, tau,
                             score_ema, seed, grad_scale, found_inf, block_sums) -> None:
        _check_block_sums_fake(scores, mask, block_sums)
