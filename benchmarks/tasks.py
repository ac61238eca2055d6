"""The benchmark tasks: their data, their models, and every PyTorch implementation of them.

A task is data (a list of examples, prepared once, picklable) plus the per-example model of
dynbatch/models. An implementation is a pair of functions over ``(model, minibatch)``:
``losses`` -> per-example training losses (a tensor ``[B]``, summed for the backward pass) and
``infer`` -> the inference output as one tensor (root logits for trees, every token's logits
for the tagger, in example order). Every implementation of a task starts from the same
weights (a copy of one seeded model) and sees the same minibatches.

Tasks:
    sst128  binary Tree-LSTM, SST trees, embedding 128 / hidden 128, a loss on every node
    sst300  the same model at Tai et al.'s sizes, embedding 300 / hidden 150
    ast     Child-Sum Tree-LSTM over standard-library function ASTs, 128 / 128, root loss
    tagger  BiLSTM tagger over SST sentences (each word's own sentiment label is its tag),
            written with two nn.LSTMCell loops
    tagger-lstm  the same tagger written with one nn.LSTM(bidirectional=True) call
"""
from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

import dynbatch as db
from benchmarks import handbatched as hb
from dynbatch.models import BiLSTMTagger, BinaryTreeLSTM, ChildSumTreeLSTM, LSTMTagger

TASKS = ("sst128", "sst300", "ast", "tagger", "tagger-lstm")
TAGGERS = ("tagger", "tagger-lstm")
TASK_INFO = {
    "sst128": "Binary Tree-LSTM, SST train trees, embed {e} / hidden {h}, 5-way loss on every node",
    "sst300": "Binary Tree-LSTM, SST train trees, embed {e} / hidden {h}, 5-way loss on every node",
    "ast": "Child-Sum Tree-LSTM, stdlib function ASTs (<= 120 nodes), embed {e} / hidden {h}, "
           "20-way root loss",
    "tagger": "BiLSTM tagger (LSTMCell per step, both directions), SST sentences, embed {e} / "
              "hidden {h}, 5 tags (each word's sentiment), loss on every token",
    "tagger-lstm": "BiLSTM tagger (one nn.LSTM call per sentence), SST sentences, embed {e} / "
                   "hidden {h}, 5 tags (each word's sentiment), loss on every token",
}
DIMS = {"sst128": (128, 128), "sst300": (300, 150), "ast": (128, 128), "tagger": (128, 128),
        "tagger-lstm": (128, 128)}
TINY_DIMS = (8, 6)
AST_MAX_NODES = 120
AST_CLASSES = 20


@dataclass(eq=False, slots=True)
class Tree:
    """The tree protocol of dynbatch.models: a token id on every node, a label at the root."""
    word_id: int
    children: tuple
    label: int = -1


@dataclass
class TaskData:
    name: str
    examples: list
    vocab_size: int
    num_classes: int
    embed: int
    hidden: int
    source: str                     # where the examples came from, in words
    extra: dict = field(default_factory=dict)

    @property
    def info(self) -> str:
        return TASK_INFO[self.name].format(e=self.embed, h=self.hidden)


class DataMissing(Exception):
    """The task's data is not on this machine; the message says what was looked for."""


def sst_dir(explicit=None) -> Path:
    """Where the benchmarks read SST: ``explicit``, else $DYNBATCH_SST_DIR, else
    ../shared/data/sst beside the repository (existence is checked by the loader)."""
    from dynbatch.data import sst
    return sst.sst_dir(explicit or None) or \
        Path(__file__).resolve().parents[2] / "shared" / "data" / "sst"


def load_task_or_exit(name: str, *, limit: int, sst_dir: Path, tiny: bool = False) -> TaskData:
    """``load_task`` for a command-line tool: missing data ends the tool with the message
    (which names the path it tried and how to give another), not a traceback."""
    try:
        return load_task(name, limit=limit, sst_dir=sst_dir, tiny=tiny)
    except DataMissing as err:
        raise SystemExit(str(err)) from None


# ---------------------------------------------------------------------------------------
# data


_SST_CACHE: dict = {}


def _sst(sst_dir: Path, limit: int):
    key = (str(sst_dir), limit)
    if key not in _SST_CACHE:        # three tasks read the same trees: parse once
        _SST_CACHE[key] = _read_sst(sst_dir, limit)
    return _SST_CACHE[key]


def _read_sst(sst_dir: Path, limit: int):
    from dynbatch.data import sst
    if not (sst_dir / "train.txt").is_file():
        raise DataMissing(f"SST not found at {sst_dir}/train.txt (pass --sst-dir or set "
                          f"$DYNBATCH_SST_DIR)")
    train = sst.load_split(sst_dir, "train", "fine")
    vocab = sst.build_vocab(train)          # the whole training split's words
    trees = [sst.index_tree(t, vocab) for t in train[:limit]]
    return trees, len(vocab), f"first {len(trees)} of {len(train)} SST train trees " \
                              f"({sst_dir}), vocabulary of the whole train split"


def load_task(name: str, *, limit: int, sst_dir: Path, tiny: bool = False) -> TaskData:
    embed, hidden = TINY_DIMS if tiny else DIMS[name]
    if name in ("sst128", "sst300"):
        trees, vocab, source = _sst(sst_dir, limit)
        return TaskData(name, trees, vocab, 5, embed, hidden, source,
                        {"nodes": sum(t.size() for t in trees)})
    if name in TAGGERS:
        trees, vocab, source = _sst(sst_dir, limit)
        examples = []
        for t in trees:
            leaves = [n for n in t.postorder() if not n.children]
            examples.append(([n.word_id for n in leaves], [n.label for n in leaves]))
        return TaskData(name, examples, vocab, 5, embed, hidden,
                        source.replace("trees", "sentences"),
                        {"tokens": sum(len(w) for w, _ in examples)})
    if name == "ast":
        from dynbatch.data import pyast
        corpus = pyast.load_functions(max_files=8 if tiny else None, max_nodes=AST_MAX_NODES)
        train, _, _ = pyast.split(corpus)
        labels = [label for label, _ in pyast.top_labels(train, AST_CLASSES)]
        label_id = {label: i for i, label in enumerate(labels)}
        vocab = pyast.build_vocab(train, min_count=2)

        def index(node, label=-1) -> Tree:
            return Tree(vocab[node.token], tuple(index(c) for c in node.children), label)

        kept = [f for f in train if f.label in label_id]
        random.Random(0).shuffle(kept)     # mixes files; the same order on every machine
        trees = [index(f.tree, label_id[f.label]) for f in kept[:limit]]
        return TaskData(name, trees, len(vocab), len(labels), embed, hidden,
                        f"{len(trees)} of {len(kept)} stdlib train functions "
                        f"(<= {AST_MAX_NODES} nodes, top {len(labels)} labels), "
                        f"shuffled with seed 0",
                        {"nodes": sum(_size(t) for t in trees)})
    raise ValueError(f"unknown task {name!r}; expected one of {TASKS}")


def _size(t) -> int:
    return 1 + sum(_size(c) for c in t.children)


def example_size(task: str, ex) -> int:
    """Nodes (trees) or tokens (tagger) in one example."""
    if task in TAGGERS:
        return len(ex[0])
    return ex.size() if hasattr(ex, "size") else _size(ex)


def make_model(task: TaskData, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if task.name in ("sst128", "sst300"):
        return BinaryTreeLSTM(task.vocab_size, task.embed, task.hidden, task.num_classes)
    if task.name == "ast":
        return ChildSumTreeLSTM(task.vocab_size, task.embed, task.hidden, task.num_classes)
    if task.name == "tagger-lstm":
        return LSTMTagger(task.vocab_size, task.embed, task.hidden, task.num_classes)
    return BiLSTMTagger(task.vocab_size, task.embed, task.hidden, task.num_classes)


# ---------------------------------------------------------------------------------------
# implementations in PyTorch


class BlocksBinaryTreeLSTM(BinaryTreeLSTM):
    """The same model with its leaf cell, inner cell and node loss marked as dynbatch blocks."""
    leaf = db.block(BinaryTreeLSTM.leaf)
    node = db.block(BinaryTreeLSTM.node)
    node_loss = db.block(BinaryTreeLSTM.node_loss)


def _tree_loss(tree, model):
    return model(tree)


def _sst_logits(tree, model):
    return model.root_logits(tree)


def _ast_logits(tree, model):
    return model.logits(tree)


def _tagger_loss(example, model):
    words, tags = example
    return model(words, tags)


def _tagger_logits(example, model):
    return model.predict_logits(example[0])


_DB_FNS = {
    (kind, strategy): db.batched(fn, strategy=strategy)
    for strategy in ("agenda", "depth")
    for kind, fn in (("tree_loss", _tree_loss), ("sst_logits", _sst_logits),
                     ("ast_logits", _ast_logits), ("tagger_loss", _tagger_loss),
                     ("tagger_logits", _tagger_logits))
}


@dataclass
class TorchImpl:
    """A PyTorch implementation: per-example losses and the inference output of a minibatch.
    ``uses_dynbatch`` marks the ones whose runs publish ``db.stats()``; ``batched``: for a
    dynbatch implementation, its ``@db.batched`` loss and inference functions with what
    turns each one's list of results into the tensor ``losses`` and ``infer`` return (what
    db.DataLoader plans ahead)."""
    name: str
    losses: Callable[[nn.Module, list], Tensor]
    infer: Callable[[nn.Module, list], Tensor]
    prepare: Callable[[nn.Module], nn.Module] = lambda m: m
    uses_dynbatch: bool = False
    batched: dict | None = None


def _eager(task: str) -> TorchImpl:
    if task == "tagger":
        return TorchImpl("eager",
                         lambda m, b: torch.stack([m(w, t) for w, t in b]),
                         lambda m, b: torch.stack([l for w, _ in b for l in m.predict_logits(w)]))
    if task == "tagger-lstm":
        return TorchImpl("eager",
                         lambda m, b: torch.stack([m(w, t) for w, t in b]),
                         lambda m, b: torch.cat([m.predict_logits(w) for w, _ in b]))
    logits = (lambda m, t: m.root_logits(t)) if task != "ast" else (lambda m, t: m.logits(t))
    return TorchImpl("eager", lambda m, b: torch.stack([m(t) for t in b]),
                     lambda m, b: torch.stack([logits(m, t) for t in b]))


def _hand(task: str) -> TorchImpl:
    if task in TAGGERS:
        return TorchImpl("hand",
                         lambda m, b: hb.padded_tagger_loss(m, [w for w, _ in b],
                                                            [t for _, t in b]),
                         lambda m, b: hb.padded_tagger_logits(m, [w for w, _ in b]))
    if task == "ast":
        return TorchImpl("hand", hb.handbatched_childsum_loss, hb.handbatched_childsum_root_logits)
    return TorchImpl("hand", hb.handbatched_binary_treelstm_loss,
                     hb.handbatched_binary_treelstm_root_logits)


def _to_blocks(model: nn.Module) -> nn.Module:
    blocks = copy.copy(model)          # shares the parameters; only the class differs
    blocks.__class__ = BlocksBinaryTreeLSTM
    return blocks


def _flat_logits(results) -> Tensor:
    return torch.stack([l for ls in results for l in ls])


def _dynbatch(task: str, strategy: str, blocks: bool) -> TorchImpl:
    name = f"dynbatch-{'blocks-' if blocks else ''}{strategy}"
    if task in TAGGERS:
        loss, infer = _DB_FNS["tagger_loss", strategy], _DB_FNS["tagger_logits", strategy]
        join_infer = _flat_logits if task == "tagger" else torch.cat
    else:
        loss = _DB_FNS["tree_loss", strategy]
        infer = _DB_FNS["ast_logits" if task == "ast" else "sst_logits", strategy]
        join_infer = torch.stack
    return TorchImpl(name, lambda m, b: torch.stack(loss(b, m)),
                     lambda m, b: join_infer(infer(b, m)),
                     prepare=_to_blocks if blocks else (lambda m: m), uses_dynbatch=True,
                     batched={"train": (loss, torch.stack), "infer": (infer, join_infer)})


def torch_impl(task: str, name: str) -> TorchImpl | None:
    """The PyTorch implementation ``name`` of ``task``, or None if it has no such form."""
    if name == "eager":
        return _eager(task)
    if name == "hand":
        return _hand(task)
    for strategy in ("agenda", "depth"):
        if name == f"dynbatch-{strategy}":
            return _dynbatch(task, strategy, False)
        if name == f"dynbatch-blocks-{strategy}":
            return _dynbatch(task, strategy, True) if task in ("sst128", "sst300") else None
    return None


def minibatches(examples: list, size: int, count: int) -> list[list]:
    """``count`` consecutive minibatches of ``size`` examples, wrapping around the data."""
    n = len(examples)
    return [[examples[(k * size + j) % n] for j in range(size)] for k in range(count)]


