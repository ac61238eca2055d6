"""BiLSTM tagger written per sentence, batched by dynbatch, next to the padded version.

Task: over SST sentences, tag every word with its own SST leaf label (5 sentiment classes).
The model (dynbatch/models/tagger.py) is written for ONE sentence, with no padding:
`LSTMTagger` (the default, `--form lstm`) embeds the sentence, runs one
`nn.LSTM(bidirectional=True)` over it and a linear layer on every token; `BiLSTMTagger`
(`--form cells`) runs two `nn.LSTMCell` loops instead. dynbatch batches either across
sentences of every length with one decorator: the nn.LSTM over all the minibatch's
sentences is one packed call, the embedding, linear layer and loss one call each. The same
weights also run as what one writes by hand: padding + `pack_padded_sequence` through
`nn.LSTM` (benchmarks/handbatched.py, `padded_tagger_loss`). The script shows that the
three compute the same losses and gradients, trains briefly with dynbatch, and times a
training step (forward + backward) of eager per sentence, dynbatch and padded.

    python examples/sst_tagger.py                  # ~1-2 minutes on 2 CPU cores
    python examples/sst_tagger.py --seconds 10     # shorter training
    python examples/sst_tagger.py --form cells     # the nn.LSTMCell form
"""
from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import dynbatch as db  # noqa: E402
from benchmarks.handbatched import padded_tagger_loss  # noqa: E402
from dynbatch.data import sst  # noqa: E402
from dynbatch.models.tagger import BiLSTMTagger, LSTMTagger  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "sst"


@db.batched
def sentence_loss(example, model):
    words, tags = example
    return model(words, tags)


@db.batched
def sentence_logits(example, model):
    logits = model.predict_logits(example[0])
    return torch.stack(logits) if isinstance(logits, list) else logits


def eager_losses(model, examples) -> list[torch.Tensor]:
    return [model(words, tags) for words, tags in examples]


def padded_losses(model, examples) -> torch.Tensor:
    return padded_tagger_loss(model, [w for w, _ in examples], [t for _, t in examples])


def tagged(trees) -> list[tuple[list[int], list[int]]]:
    """(word ids, leaf labels) of every tree's sentence."""
    out = []
    for tree in trees:
        leaves = [n for n in tree.postorder() if n.is_leaf]
        out.append(([n.word_id for n in leaves], [n.label for n in leaves]))
    return out


def resolve_data(explicit: str | None) -> Path:
    found = sst.sst_dir(explicit)
    path = found if found is not None else DEFAULT_DATA
    if not (path / "train.txt").exists():
        raise SystemExit(f"SST not found in {path} (pass --data DIR or set {sst.DATA_ENV})")
    return path


def _grads(model, loss) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p)
             for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads


def equality_check(model, examples) -> dict[str, float]:
    """Max abs difference of per-sentence losses and of parameter gradients (of the summed
    loss), dynbatch and padded against eager, on the same weights and sentences."""
    eager = torch.stack(eager_losses(model, examples))
    runs = {"dynbatch": torch.stack(sentence_loss(examples, model)),
            "padded": padded_losses(model, examples)}
    g_eager = _grads(model, eager.sum())
    diffs = {}
    for name, losses in runs.items():
        g = _grads(model, losses.sum())
        diffs[f"{name}_loss"] = (losses - eager).abs().max().item()
        diffs[f"{name}_grad"] = max((a - b).abs().max().item() for a, b in zip(g, g_eager))
    return diffs


def speeds(model, examples, batch: int, minibatches: int) -> dict[str, float]:
    """Sentences/s of a training step (forward + backward), the three ways interleaved on the
    same minibatches; medians."""
    times: dict[str, list[float]] = {"eager": [], "dynbatch": [], "padded": []}
    for k in range(minibatches):
        chunk = examples[k * batch:(k + 1) * batch]
        for name in times:
            t0 = time.perf_counter()
            if name == "eager":
                loss = torch.stack(eager_losses(model, chunk)).sum()
            elif name == "dynbatch":
                loss = torch.stack(sentence_loss(chunk, model)).sum()
            else:
                loss = padded_losses(model, chunk).sum()
            loss.backward()
            times[name].append(len(chunk) / (time.perf_counter() - t0))
    model.zero_grad()
    return {k: statistics.median(v) for k, v in times.items()}


def token_accuracy(model, examples, batch: int = 256) -> float:
    correct = total = 0
    with torch.no_grad():
        for start in range(0, len(examples), batch):
            chunk = examples[start:start + batch]
            logits = sentence_logits(chunk, model)
            for lg, (_, tags) in zip(logits, chunk):
                correct += sum(p == t for p, t in zip(lg.argmax(1).tolist(), tags))
                total += len(tags)
    return correct / max(1, total)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help="directory with {train,dev,test}.txt")
    ap.add_argument("--form", choices=("lstm", "cells"), default="lstm",
                    help="the per-sentence model: one nn.LSTM call (default) or two "
                         "nn.LSTMCell loops")
    ap.add_argument("--embed-dim", type=int, default=64)
    ap.add_argument("--hidden-dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.01, help="Adam learning rate")
    ap.add_argument("--seconds", type=float, default=40.0, help="training time budget")
    ap.add_argument("--epochs", type=int, default=100, help="at most this many epochs")
    ap.add_argument("--limit", type=int, help="use the first N training sentences")
    ap.add_argument("--eval-limit", type=int, default=500, help="dev sentences for accuracy")
    ap.add_argument("--check", type=int, default=32, help="sentences in the equality check")
    ap.add_argument("--speed-batches", type=int, default=3,
                    help="minibatches timed per implementation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: on a shared or small machine more "
                         "threads make small batched ops slower; 0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()} (--threads N; 0 keeps torch's default)")
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    t0 = time.perf_counter()
    data = resolve_data(args.data)
    train_trees = sst.load_split(data, "train", "fine")[:args.limit]
    vocab = sst.build_vocab(train_trees)
    train = tagged(sst.index_tree(t, vocab) for t in train_trees)
    dev = tagged(sst.load_split(data, "dev", "fine", vocab)[:args.eval_limit])
    print(f"SST sentences: {len(train)} train, {len(dev)} dev, vocab {len(vocab)}, "
          f"{sum(len(w) for w, _ in train)} training tokens; "
          f"loaded in {time.perf_counter() - t0:.1f} s", flush=True)

    counts = [0] * sst.NUM_CLASSES["fine"]
    for _, tags in train:
        for t in tags:
            counts[t] += 1
    majority = max(range(len(counts)), key=counts.__getitem__)
    dev_tokens = [t for _, tags in dev for t in tags]
    baseline = sum(t == majority for t in dev_tokens) / max(1, len(dev_tokens))
    print(f"majority tag {majority}: dev token accuracy {baseline:.3f}")

    cls = LSTMTagger if args.form == "lstm" else BiLSTMTagger
    model = cls(len(vocab), args.embed_dim, args.hidden_dim, sst.NUM_CLASSES["fine"])
    print(f"model: {cls.__name__} ({args.form} form), embed {args.embed_dim}, hidden "
          f"{args.hidden_dim}")
    result: dict = {"args": vars(args), "majority_dev_token_acc": baseline}

    # Same weights: the model itself, and a float64 copy of it (where any difference left
    # would be a different computation rather than float32 rounding).
    result["max_abs_diff"] = {}
    for dtype in (torch.get_default_dtype(), torch.float64):
        old = torch.get_default_dtype()
        torch.set_default_dtype(dtype)   # the model makes its zero states in the default dtype
        try:
            diffs = equality_check(copy.deepcopy(model).to(dtype), train[:args.check])
        finally:
            torch.set_default_dtype(old)
        result["max_abs_diff"][str(dtype)] = diffs
        print(f"same weights, {min(args.check, len(train))} sentences, {dtype}: max abs "
              f"difference vs eager per sentence: dynbatch loss {diffs['dynbatch_loss']:.1e}, "
              f"grads {diffs['dynbatch_grad']:.1e}; padded loss {diffs['padded_loss']:.1e}, "
              f"grads {diffs['padded_grad']:.1e}", flush=True)

    optim = torch.optim.Adam(model.parameters(), lr=args.lr)
    deadline = time.perf_counter() + args.seconds
    result["epochs"] = []
    epoch = 0
    while epoch < args.epochs and time.perf_counter() < deadline:
        epoch += 1
        random.shuffle(train)
        total, tokens, seen, t_step = 0.0, 0, 0, 0.0
        for start in range(0, len(train), args.batch):
            chunk = train[start:start + args.batch]
            ts = time.perf_counter()
            optim.zero_grad()
            losses = sentence_loss(chunk, model)
            n_tokens = sum(len(w) for w, _ in chunk)
            loss = torch.stack(losses).sum() / n_tokens   # mean over tokens
            loss.backward()
            optim.step()
            t_step += time.perf_counter() - ts
            total += loss.item() * n_tokens
            tokens += n_tokens
            seen += len(chunk)
            if time.perf_counter() >= deadline:
                break
        row = {"epoch": epoch, "sentences": seen, "loss": total / max(1, tokens),
               "sentences_per_s": seen / max(t_step, 1e-9)}
        row["dev_token_acc"] = token_accuracy(model, dev)
        result["epochs"].append(row)
        print(f"epoch {epoch}: {seen} sentences, loss/token {row['loss']:.3f}, "
              f"{row['sentences_per_s']:.0f} sentences/s (dynbatch training step), "
              f"dev token acc {row['dev_token_acc']:.3f}", flush=True)

    speed = speeds(model, train, args.batch, args.speed_batches)
    result["speed"] = speed
    print(f"training step (forward+backward), minibatch {args.batch}, sentences/s: "
          f"eager per sentence {speed['eager']:.0f}, dynbatch {speed['dynbatch']:.0f} "
          f"({speed['dynbatch'] / speed['eager']:.1f}x eager, "
          f"{speed['dynbatch'] / speed['padded']:.2f}x padded), padded+packed nn.LSTM "
          f"{speed['padded']:.0f}")
    s = db.stats()
    result["last_stats"] = {"nodes": s.nodes, "batches": s.batches, "fallbacks": s.fallbacks}
    print(f"dynbatch, last minibatch: {s}")
    return result


if __name__ == "__main__":
    main()
