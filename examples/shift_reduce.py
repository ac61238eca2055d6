"""A shift-reduce constituency parser over SST sentences whose actions come from its own
scores at inference: data-dependent control flow, batched with dynbatch.

The model (dynbatch/models/parser.py) is written for ONE sentence: a BiLSTM over the words
fills the buffer; a stack of Tree-LSTM states; SHIFT pushes the buffer front, REDUCE
composes the top two; an MLP over [stack top; stack second; buffer front] scores the two
actions whenever both are legal (SHIFT needs a non-empty buffer, REDUCE two stack items).
Gold transitions come from the binary SST trees (post-order: leaf = SHIFT, internal node =
REDUCE). Training: teacher forcing, cross-entropy per decision, batched with ``@db.batched``.
Parsing: each decision is ``int(scores.argmax())``, a read; under ``@db.batched`` every
sentence is suspended at its read until all sentences of the minibatch have reached theirs,
then the pending work those reads need runs as batched calls, for all sentences at once.
Minibatches hold sentences of similar length (a minibatch takes as many rounds as its
longest sentence has decisions); the timing also shows minibatches in file order.

Reported: unlabelled bracketing F1 on dev and test (spans of internal nodes; the trivial
whole-sentence span is EXCLUDED, its F1 with it is printed too; micro-averaged over the
split; both trees are binary with n - 2 non-trivial spans, so precision = recall = F1)
against right-branching (also with the final punctuation attached at the top, the stronger
trivial baseline on SST), left-branching and random-legal baselines; exact agreement of
batched and eager parses; batched calls against sentences x transitions; parsing speed of
dynbatch against the eager per-sentence loop (sentences/s, median of interleaved reps).

    python examples/shift_reduce.py                          # ~4 minutes on 2 CPU cores
    python examples/shift_reduce.py --limit 500 --epochs 1   # a quick look
    python examples/shift_reduce.py --limit 0 --epochs 3     # all 8544 training sentences
Data: ../shared/data/sst/{train,dev,test}.txt from the repository root (or --data, or
$DYNBATCH_SST_DIR); the script exits cleanly with a message when they are absent.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import dynbatch as db  # noqa: E402
from dynbatch.data import sst  # noqa: E402
from dynbatch.models import parser as P  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # progress bars are optional
    tqdm = None


class Sentence:
    """What the per-sentence code needs: word ids, gold transitions, gold spans."""

    __slots__ = ("words", "ids", "gold", "spans")

    def __init__(self, tree, vocab):
        self.words = tree.words()
        self.ids = vocab.lookup(self.words)
        self.gold = P.gold_transitions(tree)
        self.spans = P.tree_spans(tree)

    def __len__(self):
        return len(self.ids)


@db.batched
def batch_loss(sentence, model):
    return model.loss(sentence.ids, sentence.gold)


@db.batched
def batch_parse(sentence, model):
    return model.parse(sentence.ids)


def eager_parse(sentences, model):
    return [model.parse(s.ids) for s in sentences]


def chunks(items, size):
    return [items[i:i + size] for i in range(0, len(items), size)]


def progress(iterable, total, desc):
    if tqdm is not None:
        return tqdm(iterable, total=total, desc=desc, leave=False, mininterval=1.0,
                    dynamic_ncols=True)
    return iterable


def parse_all(model, sentences, batch_size, desc):
    """Parse batched, in minibatches of sentences of similar length (the rounds of a
    minibatch follow its longest sentence); results in the input order."""
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    out = [None] * len(sentences)
    with torch.no_grad():
        for idx in progress(chunks(order, batch_size),
                            (len(sentences) + batch_size - 1) // batch_size, desc):
            for i, actions in zip(idx, batch_parse([sentences[i] for i in idx], model)):
                out[i] = actions
    return out


def bracket_f1(sentences, parses, include_root=False) -> tuple[float, float, float]:
    matched = gold = pred = 0
    for s, actions in zip(sentences, parses):
        m, g, p = P.bracket_counts(s.spans, P.spans_from_transitions(actions), len(s),
                                   include_root)
        matched, gold, pred = matched + m, gold + g, pred + p
    precision = matched / pred if pred else 0.0
    recall = matched / gold if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def random_legal(n: int, rng: random.Random) -> list[int]:
    actions, stack, i = [], 0, 0
    while i < n or stack > 1:
        legal = [a for a in (P.SHIFT, P.REDUCE) if P.is_legal(a, stack, n - i)]
        a = rng.choice(legal)
        stack, i = (stack + 1, i + 1) if a == P.SHIFT else (stack - 1, i)
        actions.append(a)
    return actions


PUNCT = {".", "!", "?", "...", ";", ":", "--", ","}


def right_branching_punct(words) -> list[int]:
    """Right-branching over the words before a final punctuation mark, which attaches at
    the top: ((w0 (w1 (... w_n-2))) .). A stronger trivial baseline on SST, whose trees
    attach the final period high."""
    n = len(words)
    if n >= 3 and words[-1] in PUNCT:
        return P.right_branching(n - 1) + [P.SHIFT, P.REDUCE]
    return P.right_branching(n)


def bracketed(words, actions) -> str:
    stack, i = [], 0
    for a in actions:
        if a == P.SHIFT:
            stack.append(words[i])
            i += 1
        else:
            right, left = stack.pop(), stack.pop()
            stack.append(f"({left} {right})")
    return stack[0] if stack else ""


def train(model, train_set, dev, args, rng) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    for epoch in range(1, args.epochs + 1):
        model.train()
        # minibatches of sentences of similar length, in random order: a minibatch's
        # batched calls follow its longest sentence
        order = sorted(train_set, key=lambda s: (len(s), rng.random()))
        batches = chunks(order, args.batch_size)
        rng.shuffle(batches)
        t0 = time.perf_counter()
        total = decisions = 0.0
        bar = progress(batches, len(batches), f"epoch {epoch}")
        for k, batch in enumerate(bar):
            outs = batch_loss(batch, model)
            n = sum(d for _, d in outs)
            if n == 0:
                continue
            loss = torch.stack([l for l, _ in outs]).sum() / n
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            total += loss.item() * n
            decisions += n
            if tqdm is not None:
                bar.set_postfix(loss=f"{total / decisions:.3f}")
            elif (k + 1) % 10 == 0:
                print(f"  epoch {epoch} batch {k + 1}/{len(batches)} loss "
                      f"{total / decisions:.3f}", flush=True)
        elapsed = time.perf_counter() - t0
        model.eval()
        probe = dev[:args.dev_probe]
        _, _, f1 = bracket_f1(probe, parse_all(model, probe, args.parse_batch_size, "dev"))
        print(f"epoch {epoch}: loss/decision {total / max(decisions, 1):.4f}, "
              f"{len(order) / elapsed:.0f} sentences/s batched training ({elapsed:.0f} s); "
              f"F1 on the first {len(probe)} dev sentences {f1:.1%}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=None, help="SST directory (default: "
                    "../shared/data/sst from the repository root, or $DYNBATCH_SST_DIR)")
    ap.add_argument("--limit", type=int, default=4000, help="training sentences (0: all)")
    ap.add_argument("--eval-limit", type=int, default=0,
                    help="dev and test sentences each (0: all)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--dev-probe", type=int, default=256,
                    help="dev sentences parsed after each epoch")
    ap.add_argument("--batch-size", type=int, default=64, help="training minibatch")
    ap.add_argument("--parse-batch-size", type=int, default=128,
                    help="parsing minibatch (evaluation and timing)")
    ap.add_argument("--embed", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--speed-sentences", type=int, default=256,
                    help="dev sentences timed, eager vs batched")
    ap.add_argument("--reps", type=int, default=3, help="interleaved timing repetitions")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    data = sst.sst_dir(args.data) or ROOT.parent / "shared" / "data" / "sst"
    if not all((data / f"{s}.txt").is_file() for s in sst.SPLITS):
        print(f"SST not found in {data} (expected train.txt, dev.txt, test.txt); pass --data "
              f"or set ${sst.DATA_ENV}. Skipping.")
        return 0
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)

    t0 = time.perf_counter()
    train_trees = sst.load_split(data, "train")
    rng.shuffle(train_trees)
    if args.limit:
        train_trees = train_trees[:args.limit]
    vocab = sst.build_vocab(train_trees, min_count=2)
    train_set = [Sentence(t, vocab) for t in train_trees]
    splits = {}
    for name in ("dev", "test"):
        trees = sst.load_split(data, name)
        splits[name] = [Sentence(t, vocab) for t in trees[:args.eval_limit or None]]
    dev, test = splits["dev"], splits["test"]
    print(f"SST from {data}: {len(train_set)} train / {len(dev)} dev / {len(test)} test "
          f"sentences, vocabulary {len(vocab)} (train words seen twice); "
          f"{time.perf_counter() - t0:.1f} s to load; {args.threads} torch thread(s)")

    model = P.ShiftReduceParser(len(vocab), args.embed, args.hidden, args.hidden, args.hidden)
    train(model, train_set, dev, args, rng)
    model.eval()

    # -- bracketing F1 against baselines ---------------------------------------------------
    print("\nunlabelled bracketing over internal-node spans, whole-sentence span excluded "
          "(micro F1; with binary trees P = R = F1):")
    print(f"  {'':28s} {'dev F1':>8} {'test F1':>8}")
    results = {}
    for name, sents in splits.items():
        t0 = time.perf_counter()
        results[name] = parse_all(model, sents, args.parse_batch_size, name)
        results[name + "_s"] = time.perf_counter() - t0
    base_rng = random.Random(1)
    rows = [("shift-reduce (this model)", {k: results[k] for k in splits}),
            ("right-branching", {k: [P.right_branching(len(s)) for s in v]
                                 for k, v in splits.items()}),
            ("right-branching, final punct", {k: [right_branching_punct(s.words) for s in v]
                                              for k, v in splits.items()}),
            ("left-branching", {k: [P.left_branching(len(s)) for s in v]
                                for k, v in splits.items()}),
            ("random legal actions", {k: [random_legal(len(s), base_rng) for s in v]
                                      for k, v in splits.items()})]
    for label, parses in rows:
        f1s = [bracket_f1(splits[k], parses[k])[2] for k in ("dev", "test")]
        print(f"  {label:28s} {f1s[0]:8.1%} {f1s[1]:8.1%}")
    root_f1 = bracket_f1(test, results["test"], include_root=True)[2]
    print(f"  (test F1 with the whole-sentence span included: {root_f1:.1%})")
    print(f"  batched parsing of all of dev and test: "
          f"{(len(dev) + len(test)) / (results['dev_s'] + results['test_s']):.0f} "
          f"sentences/s (minibatches of {args.parse_batch_size}, sorted by length)")
    example = min((s for s in dev if 8 <= len(s) <= 12), key=len, default=dev[0])
    k = dev.index(example)
    print(f"\n  gold:  {bracketed(example.words, example.gold)}")
    print(f"  model: {bracketed(example.words, results['dev'][k])}")

    # -- agreement, batching, speed against eager ------------------------------------------
    sample = dev[:args.speed_sentences]
    size = args.parse_batch_size
    orders = {"file order": chunks(sample, size),
              "sorted by length": chunks(sorted(sample, key=len), size)}
    with torch.no_grad():
        eager = {id(s): a for s, a in zip(sample, eager_parse(sample, model))}
        same, per_batch = 0, []
        for order, batches in orders.items():
            for chunk in batches:
                for s, actions in zip(chunk, batch_parse(chunk, model)):
                    same += actions == eager[id(s)]
                per_batch.append((order, db.stats(), chunk))
    total = len(sample) * len(orders)
    print(f"\nbatched == eager parses on {len(sample)} dev sentences (both minibatch orders): "
          f"{same}/{total}{'  (exact agreement)' if same == total else '  MISMATCH'}")
    print("batched calls per minibatch (per word: constant, Embedding, 2 LSTMCell, leaf; per "
          "decision: scorer, argmax, read; per REDUCE: compose):")
    print(f"  {'minibatches':>16} {'sentences':>9} {'transitions':>11} {'decisions':>9} "
          f"{'longest':>7} {'rounds':>6} {'nodes':>6} {'batches':>7} {'transitions/batch':>17}")
    for order, stats, chunk in per_batch:
        parses = [eager[id(s)] for s in chunk]
        transitions = sum(len(a) for a in parses)
        decisions = sum(_decisions(a) for a in parses)
        longest = max(len(a) for a in parses)
        print(f"  {order:>16} {len(chunk):9d} {transitions:11d} {decisions:9d} {longest:7d} "
              f"{stats.rounds:6d} {stats.nodes:6d} {stats.batches:7d} "
              f"{transitions / stats.batches:17.1f}")

    def run_eager():
        eager_parse(sample, model)

    def batched_runner(batches):
        def run():
            for chunk in batches:
                batch_parse(chunk, model)
        return run

    contenders = {"eager per-sentence": run_eager}
    for order, batches in orders.items():
        contenders[f"dynbatch, {order}"] = batched_runner(batches)
    times = {name: [] for name in contenders}
    with torch.no_grad():
        for _ in range(args.reps):
            for name, fn in contenders.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    base = len(sample) / statistics.median(times["eager per-sentence"])
    print(f"\nparsing speed on {len(sample)} dev sentences, minibatches of {size}, "
          f"median of {args.reps} interleaved reps ({args.threads} thread(s)):")
    for name, ts in times.items():
        rate = len(sample) / statistics.median(ts)
        print(f"  {name:28s} {rate:8.1f} sentences/s   x{rate / base:5.2f} vs eager")
    return 0


def _decisions(actions) -> int:
    """How many of a parse's transitions were decisions (both actions legal)."""
    stack, n_left = 0, actions.count(P.SHIFT)
    count = 0
    for a in actions:
        if stack >= 2 and n_left > 0:
            count += 1
        if a == P.SHIFT:
            stack, n_left = stack + 1, n_left - 1
        else:
            stack -= 1
    return count


if __name__ == "__main__":
    sys.exit(main())
