"""Smoke tests of the examples: each one's main() trains briefly and its loss goes down.

The SST examples run on the first lines of the shared SST files (copied into a temporary
directory, never into the repository) and skip cleanly where the data is absent. Timing is
printed by the examples, never asserted.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import pytest

from dynbatch.data import sst

REPO = Path(__file__).resolve().parents[1]
SST_DIR = Path(os.environ.get(sst.DATA_ENV) or REPO.parent / "shared" / "data" / "sst")


def load_example(name: str):
    path = REPO / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def small_sst(tmp_path_factory) -> Path:
    """The first 40 train and 20 dev/test trees of SST (binary view keeps most of them)."""
    if not all((SST_DIR / f"{s}.txt").exists() for s in sst.SPLITS):
        pytest.skip(f"SST data not found in {SST_DIR} (set {sst.DATA_ENV})")
    out = tmp_path_factory.mktemp("sst")
    for split, n in (("train", 40), ("dev", 20), ("test", 20)):
        with open(SST_DIR / f"{split}.txt", encoding="utf-8") as f:
            lines = [next(f) for _ in range(n)]
        (out / f"{split}.txt").write_text("".join(lines), encoding="utf-8")
    return out


@pytest.mark.parametrize("task, workers", [("fine", 0), ("binary", 1)])
def test_sst_treelstm_trains(small_sst, tmp_path, task, workers, capsys):
    example = load_example("sst_treelstm")
    results = example.main([
        "--task", task, "--data", str(small_sst), "--out", str(tmp_path), "--limit", "40",
        "--epochs", "3", "--embed-dim", "16", "--hidden-dim", "16", "--no-progress",
        "--speed-check", "1", "--threads", "1", "--workers", str(workers)])
    losses = [e["loss"] for e in results["epochs"]]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    assert 0.0 <= results["test_acc"] <= 1.0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["test_acc"] == results["test_acc"] and saved["args"]["task"] == task
    assert (tmp_path / "model.pt").exists()
    assert set(results["speed_check"]) == {"eager", "dynbatch[none]", "dynbatch[cells]",
                                           "dynbatch[all]", "hand-batched"}
    assert re.search(rf"SST {task}: test root accuracy \d+\.\d\d%", capsys.readouterr().out)


def test_sst_treelstm_loads_glove_format(small_sst, tmp_path):
    example = load_example("sst_treelstm")
    train = sst.load_split(small_sst, "train", "fine")
    vocab = sst.build_vocab(train)
    model = example.MODELS["all"](len(vocab), 4, 4, 5)
    word = vocab.words[1]
    glove = tmp_path / "vectors.txt"
    glove.write_text(f"{word} 1 2 3 4\nnot-in-vocab-xyz 5 6 7 8\n", encoding="utf-8")
    before = model.embedding.weight.detach().clone()
    assert example.load_embeddings(model, vocab, str(glove)) == 1
    after = model.embedding.weight.detach()
    assert after[vocab[word]].tolist() == [1, 2, 3, 4]
    assert (after[2:] == before[2:]).all()   # words not in the file keep their vectors


@pytest.mark.parametrize("form", ["lstm", "cells"])
def test_sst_tagger_trains(small_sst, form):
    example = load_example("sst_tagger")
    results = example.main([
        "--data", str(small_sst), "--limit", "40", "--epochs", "3", "--seconds", "600",
        "--embed-dim", "16", "--hidden-dim", "16", "--batch", "10", "--check", "8",
        "--speed-batches", "1", "--eval-limit", "20", "--threads", "1", "--form", form])
    losses = [e["loss"] for e in results["epochs"]]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    # Equal on the same weights: float64 exactly up to rounding; float32 up to rounding too.
    for dtype, diffs in results["max_abs_diff"].items():
        tol = 1e-8 if dtype == "torch.float64" else 1e-3
        assert max(diffs.values()) < tol, (dtype, diffs)
    assert set(results["speed"]) == {"eager", "dynbatch", "padded"}
    stats = results["last_stats"]
    assert stats["fallbacks"] == 0, stats
    if form == "lstm":      # embedding, nn.LSTM, linear, loss: one call each, any lengths
        assert stats["batches"] == 4, stats


def test_seq2seq_attention_trains():
    example = load_example("seq2seq_attention")
    results = example.main([
        "--train", "160", "--test", "24", "--max-len", "12", "--seconds", "600",
        "--epochs", "2", "--embed-dim", "8", "--hidden-dim", "8", "--batch", "16",
        "--check", "6", "--speed-rounds", "1", "--threads", "1"])
    assert max(results["max_abs_diff"].values()) < 1e-8, results["max_abs_diff"]
    losses = [e["loss"] for e in results["epochs"]]
    assert len(losses) == 2 and losses[1] < losses[0], losses
    stats = results["last_stats"]
    assert stats["fallbacks"] == 0, stats
    # one call per decoder step for the recurrence, the rest across steps and lengths
    assert stats["batches"] <= 13 + 12 + 1, stats
    assert stats["decoder_steps"] > 3 * stats["batches"], stats


def test_ast_treelstm_runs(capsys):
    """The demo job on a small slice (the stdlib is on every machine, so no skip): a few
    epochs on a few hundred functions; the training loss goes down."""
    example = load_example("ast_treelstm")
    result = example.main(["--seconds", "600", "--epochs", "3", "--limit", "150",
                           "--max-files", "80", "--dim", "8", "--max-nodes", "25",
                           "--classes", "5", "--threads", "1", "--lr", "0.05"])
    out = capsys.readouterr().out
    assert re.search(r"test accuracy \d\.\d+ over \d+ functions", out), out
    losses = [h["loss"] for h in result["history"]]
    assert len(losses) == 3, result
    assert losses[-1] < losses[0], losses
