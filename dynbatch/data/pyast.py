"""Python's own standard library as a tree corpus: predict a function's name from its body.

Every `def` / `async def` in the running interpreter's stdlib becomes a `Function`: an
`AstNode` tree of node-type tokens plus identifier leaves, with the function's own name
removed and masked, labelled by `name_first_word`. Files split 80/10/10 by a hash of their
path. Pure Python (`ast`, no torch, nothing else from dynbatch but `Vocab`); prints nothing.
"""

from __future__ import annotations

import ast
import gc
import os
import re
import sysconfig
import warnings
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dynbatch.data.vocab import Vocab

__all__ = [
    "SELF", "AstNode", "Corpus", "Function", "Vocab", "build_vocab", "functions_in_source",
    "load_functions", "name_first_word", "split", "stdlib_files", "top_labels",
]

# The token that replaces the function's own name wherever it appears in its body
# (recursion, `super().__init__`, `@name.setter`): left in, it would give the label away.
SELF = "<self>"

# NOTE [stdlib selection]: test code is left out: the `test_*` convention would make "test"
# the label of a large, trivially predictable share, and test packages hold deliberately
# odd or unparsable code (lib2to3/tests/data is Python 2). Installed third-party packages are
# not the stdlib and differ per machine; config-* and _sysconfigdata* are generated per build.
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests",
                        "idle_test", "lib-dynload"})
_SKIP_DIR_PREFIXES = ("config-",)
_SKIP_FILE_PREFIXES = ("test_", "_sysconfigdata")

# Fields whose str value names something; each becomes a leaf child (NOTE [AST tokens]).
_IDENT_FIELDS = frozenset({"id", "attr", "arg", "name", "asname", "module", "names",
                           "rest", "kwd_attrs"})


@dataclass(frozen=True, slots=True)
class AstNode:
    """One token of a function tree.

    NOTE [AST tokens]: an `ast` node becomes an AstNode whose token is its class name
    ("Call", "Name", "Add"), children in `ast` field order. Identifiers (Name.id,
    Attribute.attr, arg.arg, keyword.arg, alias names, nested def/class names) become a leaf
    child holding the identifier itself; a Constant gets one leaf "<str>", "<bytes>", "<num>",
    "True", "False", "None" or "...". Load/Store/Del context nodes are dropped as noise.
    Equality is structural; key memo tables by ``id(node)``.
    """

    token: str
    children: tuple[AstNode, ...] = ()

    @property
    def is_leaf(self) -> bool:
        return not self.children

    def postorder(self) -> Iterator[AstNode]:
        """Every node, children before their parent, left to right."""
        stack: list[tuple[AstNode, bool]] = [(self, False)]
        while stack:
            node, expanded = stack.pop()
            if expanded or not node.children:
                yield node
            else:
                stack.append((node, True))
                stack.extend((c, False) for c in reversed(node.children))

    def tokens(self) -> list[str]:
        """Every node's token, in post-order."""
        return [n.token for n in self.postorder()]

    def size(self) -> int:
        """Number of nodes, leaves included."""
        return sum(1 for _ in self.postorder())

    def height(self) -> int:
        """Edges on the longest path down to a leaf: a leaf is 0 (as `sst.Node.height`)."""
        heights: dict[int, int] = {}
        for node in self.postorder():
            heights[id(node)] = 1 + max((heights[id(c)] for c in node.children), default=-1)
        return heights[id(self)]


@dataclass
class Function:
    """One function definition: its tree (name removed), label, and where it came from."""

    name: str
    label: str
    tree: AstNode
    path: str  # relative to the stdlib root, "/"-separated: the split key
    lineno: int


@dataclass
class Corpus:
    """The result of `load_functions`, with the counts of what was left out."""

    root: str
    functions: list[Function] = field(default_factory=list)
    files: int = 0  # files parsed
    skipped_files: list[str] = field(default_factory=list)  # unreadable or unparsable
    dropped_large: int = 0  # functions over max_nodes


_CAMEL_WORD = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")


def name_first_word(name: str) -> str:
    """The class label of a function name: its first word, lowercased.

    Dunders (``__init__``, ``__eq__``) all map to "__dunder__"; any other leading
    underscore (private, name-mangled) maps to "_". Otherwise the first snake_case part,
    split again at camelCase: "get_value", "getValue" and "GetValue" give "get";
    "XMLParser" gives "xml".

    >>> [name_first_word(n) for n in ["__init__", "_helper", "assertEqual", "is_dir"]]
    ['__dunder__', '_', 'assert', 'is']
    """
    if len(name) > 4 and name.startswith("__") and name.endswith("__") and name[2] != "_":
        return "__dunder__"
    if name.startswith("_"):
        return "_"
    first = name.split("_", 1)[0]
    match = _CAMEL_WORD.match(first)
    return (match.group() if match else first).lower()


def _constant_token(value: object) -> str:
    if value is None or value is Ellipsis or isinstance(value, bool):
        return "..." if value is Ellipsis else str(value)
    if isinstance(value, str):
        return "<str>"
    if isinstance(value, bytes):
        return "<bytes>"
    return "<num>"


class _TooLarge(Exception):
    pass


class _Builder:
    """Turns one function's `ast` into an AstNode, masking its name and capping its size."""

    def __init__(self, name: str, max_nodes: int | None, max_depth: int | None) -> None:
        self.name = name
        self.budget = max_nodes if max_nodes is not None else -1
        self.max_depth = max_depth if max_depth is not None else -1

    def _spend(self) -> None:
        # Abort as soon as the cap is passed: big functions are dropped anyway, and some
        # stdlib functions run to thousands of nodes.
        self.budget -= 1
        if self.budget == -1:
            raise _TooLarge

    def leaf(self, token: str) -> AstNode:
        self._spend()
        return AstNode(SELF if token == self.name else token)

    def build(self, node: ast.AST, depth: int = 0, root: bool = False) -> AstNode:
        self._spend()
        cls = type(node)
        if depth == self.max_depth:
            return AstNode(cls.__name__)
        if cls is ast.Constant:
            return AstNode("Constant", (self.leaf(_constant_token(node.value)),))
        children: list[AstNode] = []
        for fname in cls._fields:
            value = getattr(node, fname, None)
            if value is None or (root and fname == "name"):  # the root's name is the label
                continue
            if isinstance(value, ast.AST):
                if not isinstance(value, ast.expr_context):
                    children.append(self.build(value, depth + 1))
            elif type(value) is list:
                for item in value:
                    if isinstance(item, ast.AST):
                        children.append(self.build(item, depth + 1))
                    elif type(item) is str and fname in _IDENT_FIELDS:
                        children.append(self.leaf(item))
            elif type(value) is str and fname in _IDENT_FIELDS:
                children.append(self.leaf(value))
        return AstNode(cls.__name__, tuple(children))


# Statement lists that can hold a def; walking only these finds every def without
# visiting the (far more numerous) expression nodes.
_BLOCK_FIELDS = ("body", "orelse", "finalbody", "handlers", "cases")


def _defs(stmts: list[ast.AST]) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    for stmt in stmts:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield stmt
        for fname in _BLOCK_FIELDS:
            block = getattr(stmt, fname, None)
            if type(block) is list:
                yield from _defs(block)


def _functions(module: ast.Module, path: str, max_nodes: int | None,
               max_depth: int | None) -> tuple[list[Function], int]:
    found, dropped = [], 0
    for node in _defs(module.body):
        try:
            tree = _Builder(node.name, max_nodes, max_depth).build(node, root=True)
        except (_TooLarge, RecursionError):  # too deep to walk counts as too large
            dropped += 1
            continue
        found.append(Function(node.name, name_first_word(node.name), tree, path, node.lineno))
    return found, dropped


def _parse(source: str | bytes, path: str) -> ast.Module:
    # Old stdlib modules trip SyntaxWarning/DeprecationWarning (invalid escapes); this
    # module promises to print nothing.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ast.parse(source, filename=path)


def functions_in_source(source: str, path: str = "<string>", *, max_nodes: int | None = 500,
                        max_depth: int | None = None) -> list[Function]:
    """Every function in ``source`` as a `Function`; ones over ``max_nodes`` are left out.

    >>> [f.label for f in functions_in_source("def get_x(a):\\n    return get_x(a)")]
    ['get']
    """
    return _functions(_parse(source, path), path, max_nodes, max_depth)[0]


def stdlib_files(root: str | os.PathLike[str] | None = None) -> list[str]:
    """The stdlib's .py files (NOTE [stdlib selection]), relative "/"-paths, sorted."""
    root = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames
                       if d not in _SKIP_DIRS and not d.startswith(_SKIP_DIR_PREFIXES)]
        rel = Path(dirpath).relative_to(root)
        files.extend((rel / f).as_posix() for f in filenames
                     if f.endswith(".py") and not f.startswith(_SKIP_FILE_PREFIXES))
    return sorted(files)


def load_functions(max_files: int | None = None, max_nodes: int | None = 500, *,
                   max_depth: int | None = None,
                   root: str | os.PathLike[str] | None = None) -> Corpus:
    """Every function of the stdlib (or of the first ``max_files`` files, in sorted order).

    Functions over ``max_nodes`` nodes are counted in ``dropped_large``; files that cannot
    be read or parsed in ``skipped_files``. With ``max_depth``, nodes that deep lose their
    children. Takes a few seconds for the whole stdlib.
    """
    root = str(root if root is not None else sysconfig.get_paths()["stdlib"])
    # NOTE [gc pause] (see sst): the trees are acyclic, yet the cyclic collector's passes
    # over the growing heap took two thirds of the load time.
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        return _load(root, max_files, max_nodes, max_depth)
    finally:
        if gc_was_on:
            gc.enable()


def _load(root: str, max_files: int | None, max_nodes: int | None,
          max_depth: int | None) -> Corpus:
    corpus = Corpus(root)
    for rel in stdlib_files(root)[:max_files]:
        try:
            with open(os.path.join(root, rel), "rb") as f:
                module = _parse(f.read(), rel)  # bytes: ast honours the coding cookie
        except (OSError, SyntaxError, ValueError, RecursionError, MemoryError):
            corpus.skipped_files.append(rel)
            continue
        found, dropped = _functions(module, rel, max_nodes, max_depth)
        corpus.functions.extend(found)
        corpus.dropped_large += dropped
        corpus.files += 1
    return corpus


def _bucket(path: str) -> int:
    # crc32, not hash(): str hashes are salted per process, and the split must be stable.
    return zlib.crc32(path.encode("utf-8")) % 10


def split(corpus: Corpus | Iterable[Function]
          ) -> tuple[list[Function], list[Function], list[Function]]:
    """(train, dev, test), 80/10/10 by file, so no file's functions cross splits."""
    functions = corpus.functions if isinstance(corpus, Corpus) else corpus
    parts: tuple[list[Function], list[Function], list[Function]] = ([], [], [])
    for fn in functions:
        b = _bucket(fn.path)
        parts[0 if b < 8 else 1 if b == 8 else 2].append(fn)
    return parts


def top_labels(functions: Iterable[Function], k: int = 20) -> list[tuple[str, int]]:
    """The ``k`` most common labels with their counts; ties broken by label."""
    counts = Counter(f.label for f in functions)
    return sorted(counts.items(), key=lambda lc: (-lc[1], lc[0]))[:k]


def build_vocab(functions: Iterable[Function], min_count: int = 1) -> Vocab:
    """A `Vocab` of the trees' tokens (pass the training split only)."""
    return Vocab.build((f.tree.tokens() for f in functions), min_count)
