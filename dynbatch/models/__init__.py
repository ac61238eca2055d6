"""Reference models, each written for one example in plain eager PyTorch."""

from dynbatch.models.tagger import BiLSTMTagger, LSTMTagger
from dynbatch.models.tree_lstm import BinaryTreeLSTM, ChildSumTreeLSTM

__all__ = ["BiLSTMTagger", "BinaryTreeLSTM", "ChildSumTreeLSTM", "LSTMTagger"]
