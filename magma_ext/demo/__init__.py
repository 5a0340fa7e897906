"""The main demo of magma_ext: a small Llama trained on byte-level text with AdamW and Magma.

Run it with ``python -m magma_ext.demo`` (``--help`` lists the flags). The pieces are
reusable, e.g. by ``benchmarks/convergence.py``:

- :mod:`.model`: :class:`LlamaConfig`, :class:`Llama`
- :mod:`.data`: :func:`load_corpus`, :func:`batches`, :func:`eval_batches`
- :mod:`.train`: :func:`train`, :func:`adamw_factory`, :func:`magma_factory`
"""

from .data import batches, eval_batches, load_corpus
from .model import Llama, LlamaConfig
from .train import adamw_factory, magma_factory, train

__all__ = ["Llama", "LlamaConfig", "adamw_factory", "batches", "eval_batches", "load_corpus",
           "magma_factory", "train"]
