"""dynbatch: write PyTorch code for one example; run it batched.

    import dynbatch as db

    @db.batched
    def loss(tree, model): ...          # code for ONE example
    losses = loss(trees, model)          # one entry per example, real tensors

See DESIGN.md for the pipeline: trace -> signature -> schedule -> execute.
"""
from .api import DataLoader, autobatch, batched, block, force, stats
from .lazy import LazyTensor

__all__ = ["batched", "autobatch", "force", "block", "stats", "DataLoader", "LazyTensor"]
__version__ = "0.1.0"
