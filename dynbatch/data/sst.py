"""Stanford Sentiment Treebank reader: PTB brackets, one tree per line, a label 0-4 per node.

Owns parsing (`read_trees`, through `nltk.Tree.fromstring`), the light `Node` tree that models
walk, the `fine_grained` and `binary` label views, and word-id indexing. Readers take a path
and name no default location; `sst_dir` only consults an explicit path or $DYNBATCH_SST_DIR.
Pure Python + nltk: must not import torch or the rest of dynbatch.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import nltk

from dynbatch.data.vocab import Vocab

__all__ = [
    "DATA_ENV", "IGNORE", "NUM_CLASSES", "SPLITS", "Node", "Vocab", "binary", "build_vocab",
    "convert", "fine_grained", "index_tree", "load_split", "read_trees", "sst_dir",
]

DATA_ENV = "DYNBATCH_SST_DIR"
SPLITS = ("train", "dev", "test")
NUM_CLASSES = {"fine": 5, "binary": 2}

# Label of a node in the binary view whose sentiment is neutral (2). It equals PyTorch's
# default `ignore_index` (-100), so `F.cross_entropy(logits, labels)` skips such nodes
# without extra arguments; per-node code can also test `node.label == IGNORE`.
IGNORE = -100

# NOTE [SST tokens]: nltk's default token regex splits on `\s`, which in Python matches
# U+00A0; SST has words such as "8\xa01\/2" (train.txt line 4342) that must stay one word.
# So tokens end only at ASCII whitespace or an unescaped bracket. Words are otherwise kept
# exactly as in the file: "\/" and "-LRB-" are not unescaped.
_TOKEN = r"(?:\\[()]|[^ \t\n\r\f\v()])+"


@dataclass(frozen=True, slots=True)
class Node:
    """One SST constituent, as plain immutable data.

    Invariants: a leaf has ``word`` set and no children; an internal node has ``word`` None
    and at least one child. ``label`` is 0-4 (fine view), 0/1 or ``IGNORE`` (binary view).
    ``word_id`` is None until `index_tree` sets it on the leaves.

    Equality and hashing are structural, so two identical subtrees (say, two "(2 the)"
    leaves) are equal: key per-node memo tables by ``id(node)``, not by the node.
    """

    label: int
    word: str | None
    children: tuple[Node, ...] = ()
    word_id: int | None = None

    @property
    def is_leaf(self) -> bool:
        return not self.children

    def postorder(self) -> Iterator[Node]:
        """Every node, children before their parent, left to right."""
        # Iterative so that no tree shape can hit the recursion limit.
        stack: list[tuple[Node, bool]] = [(self, False)]
        while stack:
            node, expanded = stack.pop()
            if expanded or not node.children:
                yield node
            else:
                stack.append((node, True))
                stack.extend((c, False) for c in reversed(node.children))

    def words(self) -> list[str]:
        """The sentence: leaf words left to right."""
        return [n.word for n in self.postorder() if n.word is not None]

    def size(self) -> int:
        """Number of nodes, leaves included."""
        return sum(1 for _ in self.postorder())

    def height(self) -> int:
        """Edges on the longest path down to a leaf: a leaf is 0, its parent 1.

        This is the level at which a depth-batched model can first compute the node. It is
        nltk's ``Tree.height()`` minus 2, since nltk counts the word and its preterminal.
        """
        heights: dict[int, int] = {}
        for node in self.postorder():
            heights[id(node)] = 1 + max((heights[id(c)] for c in node.children), default=-1)
        return heights[id(self)]


def _label(text: str) -> int:
    if len(text) != 1 or text not in "01234":
        raise ValueError(f"label {text!r} is not one of 0-4")
    return int(text)


def convert(tree: nltk.Tree) -> Node:
    """The `Node` form of an SST ``nltk.Tree``; raises ValueError on a non-SST shape.

    A preterminal ``(3 word)`` becomes one leaf ``Node(3, "word")``.
    """
    if len(tree) == 1 and isinstance(tree[0], str):
        return Node(_label(tree.label()), tree[0])
    if len(tree) == 0 or any(isinstance(c, str) for c in tree):
        raise ValueError(f"node {tree.label()!r} must hold one word or only subtrees")
    return Node(_label(tree.label()), None, tuple(convert(c) for c in tree))


@contextmanager
def _gc_paused() -> Iterator[None]:
    # NOTE [gc pause]: trees are acyclic, so the cyclic collector frees nothing while a
    # corpus is built, yet its full passes over the growing heap of nodes took 40-80% of
    # the time to read or relabel a split (measured on train.txt).
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


def _read(path: str | os.PathLike[str]) -> list[tuple[nltk.Tree, Node]]:
    with _gc_paused():
        return _read_lines(path)


def _read_lines(path: str | os.PathLike[str]) -> list[tuple[nltk.Tree, Node]]:
    pairs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.strip(" \t\r\n")
            if not line:
                continue
            try:
                tree = nltk.Tree.fromstring(line, node_pattern=_TOKEN, leaf_pattern=_TOKEN)
                # Converting here validates every label and shape, so a bad line is
                # reported with its file:line rather than later inside a model.
                pairs.append((tree, convert(tree)))
            except ValueError as err:
                raise ValueError(f"{path}:{lineno}: malformed SST tree: {err}") from err
    return pairs


def read_trees(path: str | os.PathLike[str]) -> list[nltk.Tree]:
    """Every tree in a PTB-format SST file, blank lines skipped.

    Raises ValueError naming ``path:line`` (1-based) for the first malformed line.
    """
    return [tree for tree, _ in _read(path)]


def fine_grained(trees: Iterable[Node]) -> list[Node]:
    """The 5-class view: every tree, labels 0-4 unchanged."""
    return list(trees)


def _to_binary(node: Node) -> Node:
    label = IGNORE if node.label == 2 else int(node.label > 2)
    return Node(label, node.word, tuple(_to_binary(c) for c in node.children), node.word_id)


def binary(trees: Iterable[Node]) -> list[Node]:
    """The 2-class view: drops trees whose root is neutral; 0-1 -> 0, 3-4 -> 1 on every node.

    Neutral nodes inside kept trees get label `IGNORE`, for losses to skip.
    """
    with _gc_paused():
        return [_to_binary(t) for t in trees if t.label != 2]


def index_tree(node: Node, vocab: Vocab) -> Node:
    """A copy of ``node`` whose leaves carry ``word_id = vocab[word]``."""
    if node.word is not None:
        return Node(node.label, node.word, (), vocab[node.word])
    return Node(node.label, None, tuple(index_tree(c, vocab) for c in node.children))


def build_vocab(trees: Iterable[Node | nltk.Tree], min_count: int = 1) -> Vocab:
    """A `Vocab` of the trees' words (pass the training split only)."""
    return Vocab.build(
        (t.leaves() if isinstance(t, nltk.Tree) else t.words() for t in trees), min_count)


def load_split(
    root_dir: str | os.PathLike[str],
    split: Literal["train", "dev", "test"],
    view: Literal["fine", "binary"] = "fine",
    vocab: Vocab | None = None,
) -> list[Node]:
    """``<root_dir>/<split>.txt`` as `Node` trees in ``view``, word ids set if ``vocab`` is given.

    >>> train = load_split(sst_dir(), "train", "binary")   # doctest: +SKIP
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    views = {"fine": fine_grained, "binary": binary}
    if view not in views:
        raise ValueError(f"view must be one of {tuple(views)}, got {view!r}")
    trees = views[view](node for _, node in _read(Path(root_dir) / f"{split}.txt"))
    if vocab is not None:
        with _gc_paused():
            trees = [index_tree(t, vocab) for t in trees]
    return trees


def sst_dir(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """Where the SST files are: ``explicit`` if given, else $DYNBATCH_SST_DIR, else None.

    Existence is not checked, so the caller can say which of the two it tried.
    """
    if explicit is not None:
        return Path(explicit)
    env = os.environ.get(DATA_ENV)
    return Path(env) if env else None

