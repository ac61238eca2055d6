"""Tests for dynbatch.data: the SST reader, the stdlib-AST corpus and Vocab.

Small inputs are written inside the tests; the real SST files are used where present (the
shared data directory, or $DYNBATCH_SST_DIR) and skipped with a message otherwise.
"""

from __future__ import annotations

import ast
import gc
from collections.abc import Iterator
from pathlib import Path

import nltk
import pytest

from dynbatch.data import pyast, sst
from dynbatch.data.vocab import Vocab

DATA_DIR = Path(__file__).resolve().parents[1] / "dynbatch" / "data"
SST_DIR = sst.sst_dir() or Path(__file__).resolve().parents[1].parent / "shared/data/sst"

NBSP_WORD = "8\xa01\\/2"  # train.txt line 4342: "8 1/2" joined by U+00A0, "/" escaped
SMALL = [
    "(3 (2 (2 The) (2 Rock)) (4 (3 (2 is) (4 great)) (2 .)))",
    "",
    "(2 (2 Contempt) (2 (2 and) (2 " + NBSP_WORD + ")))",
    "(1 (0 awful) (2 film))",
]


def write(tmp_path: Path, lines: list[str], name: str = "train.txt") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --- SST on small files ---------------------------------------------------------------

def test_read_trees_skips_blank_lines(tmp_path):
    trees = sst.read_trees(write(tmp_path, SMALL))
    assert len(trees) == 3
    assert all(isinstance(t, nltk.Tree) for t in trees)
    assert trees[0].leaves() == ["The", "Rock", "is", "great", "."]


def test_nbsp_word_stays_one_token(tmp_path):
    # nltk's default token regex splits on \s, which matches U+00A0 in Python.
    assert nltk.Tree.fromstring(SMALL[2]).leaves()[-2:] == ["8", "1\\/2"]
    tree = sst.read_trees(write(tmp_path, SMALL))[1]
    assert tree.leaves() == ["Contempt", "and", NBSP_WORD]
    assert sst.convert(tree).words() == ["Contempt", "and", NBSP_WORD]


@pytest.mark.parametrize("bad", [
    "(2 (2 a) (2 b)",        # unbalanced
    "(2 (2 a) (2 b)))",      # extra close
    "(7 (2 a) (2 b))",       # label out of range
    "(x (2 a) (2 b))",       # label not a number
    "(2 (2 a) b)",           # a bare word beside a subtree
    "(2)",                   # empty node
    "(2 a) (2 b)",           # two trees on a line
])
def test_malformed_line_names_file_and_line(tmp_path, bad):
    path = write(tmp_path, ["(2 ok)", "", bad, "(2 fine)"])
    with pytest.raises(ValueError, match="malformed SST tree") as info:
        sst.read_trees(path)
    assert str(info.value).startswith(f"{path}:3: ")


def test_node_shape_and_traversals(tmp_path):
    tree = sst.convert(sst.read_trees(write(tmp_path, SMALL))[0])
    assert tree.label == 3 and tree.word is None and not tree.is_leaf
    assert tree.children[0].children[0] == sst.Node(2, "The")
    assert tree.words() == ["The", "Rock", "is", "great", "."]
    assert tree.size() == 9
    # Height: a leaf is 0, so the root of (3 (2 (2 The) ..) (4 (3 (2 is) ..) ..)) is 3.
    assert tree.children[0].children[0].height() == 0
    assert tree.children[0].height() == 1
    assert tree.height() == 3
    post = list(tree.postorder())
    assert post[-1] is tree and len(post) == tree.size()
    seen: set[int] = set()
    for node in post:  # children always come before their parent
        assert all(id(c) in seen for c in node.children)
        seen.add(id(node))


def test_convert_rejects_non_sst_trees():
    with pytest.raises(ValueError, match="label"):
        sst.convert(nltk.Tree("NP", [nltk.Tree("2", ["a"])]))


def test_binary_view():
    neutral_root = sst.Node(2, None, (sst.Node(4, "good"), sst.Node(0, "bad")))
    kept = sst.Node(3, None, (sst.Node(2, "the"), sst.Node(4, "best")))
    negative = sst.Node(1, "meh")
    out = sst.binary([neutral_root, kept, negative])
    assert out == [
        sst.Node(1, None, (sst.Node(sst.IGNORE, "the"), sst.Node(1, "best"))),
        sst.Node(0, "meh"),
    ]
    assert sst.fine_grained([kept]) == [kept]


def test_vocab_is_deterministic():
    vocab = Vocab.build([["b", "a", "c", "a"], ["c", "d", "<unk>"]])
    assert vocab.words == ("<unk>", "a", "c", "b", "d")  # count desc, then word
    assert vocab["a"] == 1 and vocab["zzz"] == Vocab.UNK_ID == 0 and vocab[Vocab.UNK] == 0
    assert len(vocab) == 5 and "d" in vocab and "zzz" not in vocab
    assert vocab.lookup(["c", "q"]) == [2, 0]
    assert Vocab.build([["b", "a", "c", "a"], ["c", "d"]], min_count=2).words == (
        "<unk>", "a", "c")
    with pytest.raises(TypeError, match="sequences of tokens"):
        Vocab.build(["not", "nested"])


def test_index_tree_and_load_split(tmp_path):
    write(tmp_path, SMALL, "train.txt")
    write(tmp_path, SMALL[2:], "dev.txt")
    train = sst.load_split(tmp_path, "train")
    vocab = sst.build_vocab(train)
    assert vocab == sst.build_vocab(sst.read_trees(tmp_path / "train.txt"))
    dev = sst.load_split(tmp_path, "dev", "binary", vocab=vocab)
    assert len(dev) == 1  # the neutral-rooted tree is dropped
    leaves = [n for n in dev[0].postorder() if n.is_leaf]
    assert [n.word_id for n in leaves] == [vocab["awful"], vocab["film"]]
    assert all(n.word_id is None for n in dev[0].postorder() if not n.is_leaf)
    assert [n.label for n in dev[0].postorder()] == [0, sst.IGNORE, 0]
    with pytest.raises(ValueError, match="split"):
        sst.load_split(tmp_path, "valid")
    with pytest.raises(ValueError, match="view"):
        sst.load_split(tmp_path, "dev", "ternary")


def test_sst_dir(monkeypatch, tmp_path):
    monkeypatch.delenv(sst.DATA_ENV, raising=False)
    assert sst.sst_dir() is None
    monkeypatch.setenv(sst.DATA_ENV, str(tmp_path))
    assert sst.sst_dir() == tmp_path
    assert sst.sst_dir("/elsewhere") == Path("/elsewhere")


def test_readers_import_neither_torch_nor_the_engine():
    # Checked on the source: once dynbatch/__init__ imports torch, importing these modules
    # loads torch anyway, but the readers themselves must stay usable without it.
    for path in DATA_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] != "torch", f"{path.name} imports {name}"
                assert name == "dynbatch.data" or not name.startswith("dynbatch") or \
                    name.startswith("dynbatch.data."), f"{path.name} imports {name}"


# --- SST, the real files ------------------------------------------------------------

@pytest.fixture(scope="module")
def real_nodes() -> Iterator[dict[str, list[sst.Node]]]:
    # Only Node trees are kept: ~400k nltk Trees as well would slow every later test.
    if not (SST_DIR / "train.txt").exists():
        pytest.skip(f"SST not found at {SST_DIR} (set ${sst.DATA_ENV} to its directory)")
    nodes = {split: sst.load_split(SST_DIR, split) for split in sst.SPLITS}
    # The corpus lives for the whole module: frozen, it is not rescanned by every full
    # collection that the tests' own allocations trigger.
    gc.freeze()
    yield nodes
    gc.unfreeze()


def test_real_sst_sizes_and_labels(real_nodes):
    assert {s: len(t) for s, t in real_nodes.items()} == {
        "train": 8544, "dev": 1101, "test": 2210}
    for trees in real_nodes.values():
        assert {n.label for t in trees for n in t.postorder()} == {0, 1, 2, 3, 4}
    train = real_nodes["train"]
    assert sum(t.size() for t in train) == 318582
    assert max(t.height() for t in train) == 29
    assert len(sst.build_vocab(train)) == 18281


def test_real_sst_binary_view(real_nodes):
    # The standard binary SST-2 split sizes.
    sizes = {s: len(sst.binary(t)) for s, t in real_nodes.items()}
    assert sizes == {"train": 6920, "dev": 872, "test": 1821}
    dev = sst.binary(real_nodes["dev"])
    assert {t.label for t in dev} == {0, 1}
    assert {n.label for t in dev for n in t.postorder()} == {0, 1, sst.IGNORE}


def test_real_sst_nbsp_word_intact(real_nodes):
    line_4342 = real_nodes["train"][4341]  # train.txt has no blank lines
    assert NBSP_WORD in line_4342.words()
    nbsp = {w for t in real_nodes["train"] for w in t.words() if "\xa0" in w}
    assert nbsp == {NBSP_WORD, "2\xa01\\/2"}


def test_real_read_trees_matches_load_split(real_nodes):
    trees = sst.read_trees(SST_DIR / "dev.txt")
    assert [sst.convert(t) for t in trees] == real_nodes["dev"]


# --- Python ASTs ----------------------------------------------------------------------

@pytest.mark.parametrize("name, word", [
    ("get_value", "get"), ("getValue", "get"), ("GetValue", "get"), ("setUp", "set"),
    ("XMLParser", "xml"), ("is_dir", "is"), ("test", "test"), ("md5sum", "md5sum"),
    ("__init__", "__dunder__"), ("__eq__", "__dunder__"), ("_helper", "_"),
    ("__mangled", "_"), ("_", "_"), ("___x__", "_"), ("utf_8_decode", "utf"),
])
def test_name_first_word(name, word):
    assert pyast.name_first_word(name) == word


SOURCE = '''
class Box:
    @property
    def get_item(self, key):
        """Docstrings become <str>."""
        if key is None:
            return self.get_item(0) + get_item(1)
        super().get_item(key)

        async def inner(q):
            return [x async for x in q]
        return inner
'''


def test_function_trees_hide_their_name():
    outer, inner = pyast.functions_in_source(SOURCE, "box.py")
    assert (outer.name, outer.label, outer.path, outer.lineno) == (
        "get_item", "get", "box.py", 4)
    assert (inner.name, inner.label, inner.lineno) == ("inner", "inner", 10)
    assert outer.tree.token == "FunctionDef" and inner.tree.token == "AsyncFunctionDef"
    tokens = outer.tree.tokens()
    assert "get_item" not in tokens
    assert tokens.count(pyast.SELF) == 3  # self.get_item, get_item(1), super().get_item
    # Identifiers are leaf children; the nested def keeps its name inside the outer tree.
    assert {"key", "self", "super", "property", "inner", "<str>", "None", "<num>"} <= set(
        tokens)
    assert "Load" not in tokens and "Store" not in tokens
    assert "inner" not in inner.tree.tokens()
    assert inner.tree.children[0] == pyast.AstNode("arguments", (
        pyast.AstNode("arg", (pyast.AstNode("q"),)),))


def test_size_caps():
    outer, inner = pyast.functions_in_source(SOURCE)
    assert pyast.functions_in_source(SOURCE, max_nodes=inner.tree.size()) == [inner]
    shallow = pyast.functions_in_source(SOURCE, max_depth=3)
    assert [f.tree.height() for f in shallow] == [3, 3]
    assert outer.tree.height() > 3


def test_load_functions_small():
    corpus = pyast.load_functions(max_files=6)
    files = pyast.stdlib_files()
    assert corpus.files == 6 and corpus.skipped_files == []
    assert {f.path for f in corpus.functions} <= set(files[:6])
    assert len(corpus.functions) > 10
    assert all(f.tree.size() <= 500 for f in corpus.functions)
    assert all(f.label == pyast.name_first_word(f.name) for f in corpus.functions)
    again = pyast.load_functions(max_files=6)
    assert [(f.path, f.lineno, f.tree) for f in again.functions] == [
        (f.path, f.lineno, f.tree) for f in corpus.functions]
    vocab = pyast.build_vocab(corpus.functions)
    assert vocab.words[1] == "Name"


def test_stdlib_files_leave_out_tests_and_packages():
    files = pyast.stdlib_files()
    assert "os.py" in files and "json/decoder.py" in files
    for f in files:
        parts = f.split("/")
        assert not {"site-packages", "test", "tests", "idle_test"} & set(parts), f
        assert not parts[-1].startswith("test_"), f


def test_unparsable_files_are_counted_not_raised(tmp_path):
    (tmp_path / "good.py").write_text("def is_ok():\n    return True\n")
    (tmp_path / "bad.py").write_text("def broken(:\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "t.py").write_text("def test_x(): pass\n")
    big = "def big():\n" + "".join(f"    x{i} = {i}\n" for i in range(200))
    (tmp_path / "large.py").write_text(big)
    corpus = pyast.load_functions(root=tmp_path)
    assert corpus.skipped_files == ["bad.py"] and corpus.files == 2
    assert [f.name for f in corpus.functions] == ["is_ok"]
    assert corpus.dropped_large == 1


def test_split_is_by_file_and_deterministic():
    functions = [pyast.Function(f"f{i}", "f", pyast.AstNode("FunctionDef"), path, i)
                 for i, path in enumerate(pyast.stdlib_files())]
    train, dev, test = pyast.split(functions)
    assert (train, dev, test) == pyast.split(list(functions))
    assert len(train) + len(dev) + len(test) == len(functions)
    paths = [{f.path for f in part} for part in (train, dev, test)]
    assert not (paths[0] & paths[1] or paths[0] & paths[2] or paths[1] & paths[2])
    assert 0.7 < len(train) / len(functions) < 0.9
    assert 0.05 < len(dev) / len(functions) < 0.15
    # Pinned buckets: the split must not change between machines or runs.
    where = {f.path: i for i, part in enumerate((train, dev, test)) for f in part}
    assert [where[p] for p in ("os.py", "ast.py", "asyncio/tasks.py")] == [0, 1, 0]


def test_top_labels_breaks_ties_by_label():
    leaf = pyast.AstNode("FunctionDef")
    functions = [pyast.Function(n, pyast.name_first_word(n), leaf, "x.py", 1)
                 for n in ["get_a", "set_b", "get_c", "is_d", "set_e", "_f"]]
    assert pyast.top_labels(functions, k=3) == [("get", 2), ("set", 2), ("_", 1)]
