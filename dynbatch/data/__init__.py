"""Readers for the tree corpora that dynbatch's models and benchmarks train on.

`sst`: the Stanford Sentiment Treebank (PTB brackets; the caller passes its path).
`pyast`: every function in Python's own standard library, as an AST-token tree.
`vocab`: the `Vocab` token table both share. Pure Python: nothing here imports torch.
"""

from dynbatch.data import pyast, sst, vocab
from dynbatch.data.vocab import Vocab

__all__ = ["Vocab", "pyast", "sst", "vocab"]
