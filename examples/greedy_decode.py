"""Greedy decoding with a per-example GRU decoder that stops at its own end token, batched.

Toy task, no download: reverse a random digit sequence (lengths --min-len..--max-len). The
model (dynbatch/models/decoder.py) is written for ONE sequence: a GRU encoder over the input
digits, a GRU decoder trained with teacher forcing, and at inference greedy decoding whose
next token is a read, ``int(logits.argmax())``. Under ``@db.batched`` each read suspends its
sequence until every sequence of the minibatch has reached its own read; then the pending
steps of all of them run as batched calls. The script trains briefly (batched), then shows:

  * exact agreement of the batched and the eager decoded sequences;
  * batched calls launched against examples x decoding steps;
  * speed against the eager per-sequence loop (sequences/s, median of interleaved reps),
    with a hand-batched padded decoder as a reference.

    python examples/greedy_decode.py                       # ~1 minute on 2 CPU cores
    python examples/greedy_decode.py --train-seconds 10 --reps 3
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dynbatch as db  # noqa: E402
from dynbatch.models.decoder import Seq2SeqGRU, greedy_padded  # noqa: E402

DIGITS, BOS, EOS = 10, 10, 11
VOCAB = 12


def sample(rng: random.Random, n: int, lo: int, hi: int) -> list[list[int]]:
    return [[rng.randrange(DIGITS) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


@db.batched
def batch_loss(src, model):
    return model.loss(src, src[::-1])


@db.batched
def batch_greedy(src, model, max_len):
    return model.greedy(src, max_len)


def eager_greedy(srcs, model, max_len):
    return [model.greedy(s, max_len) for s in srcs]


def chunks(items, size):
    return [items[i:i + size] for i in range(0, len(items), size)]


def train(model, args, rng) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    t0 = time.perf_counter()
    step, seen, losses = 0, 0, []
    while time.perf_counter() - t0 < args.train_seconds:
        srcs = sample(rng, args.batch_size, args.min_len, args.max_len)
        loss = torch.stack(batch_loss(srcs, model)).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        step += 1
        seen += len(srcs)
        losses.append(loss.item())
        if step % args.log_every == 0:
            elapsed = time.perf_counter() - t0
            print(f"  step {step:5d}  loss {statistics.mean(losses[-args.log_every:]):.4f}  "
                  f"{seen / elapsed:6.0f} sequences/s (batched training)", flush=True)
    print(f"trained {step} steps, {seen} sequences in {time.perf_counter() - t0:.1f} s; "
          f"last batch: {db.stats()}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train-seconds", type=float, default=35.0)
    ap.add_argument("--batch-size", type=int, default=64,
                    help="training minibatch, and inference minibatch for the checks")
    ap.add_argument("--speed-batch-sizes", default="64,256",
                    help="inference minibatch sizes timed against eager")
    ap.add_argument("--eval", type=int, default=256, help="sequences decoded and compared")
    ap.add_argument("--min-len", type=int, default=2)
    ap.add_argument("--max-len", type=int, default=7)
    ap.add_argument("--embed", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--reps", type=int, default=5, help="interleaved timing repetitions")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    model = Seq2SeqGRU(VOCAB, args.embed, args.hidden, BOS, EOS)
    print(f"reverse digit sequences of length {args.min_len}-{args.max_len}; GRU "
          f"encoder-decoder, embed {args.embed}, hidden {args.hidden}; "
          f"{args.threads} torch thread(s)")
    train(model, args, rng)

    model.eval()
    max_steps = args.max_len + 3                  # decoding stops at EOS or here
    srcs = sample(rng, args.eval, args.min_len, args.max_len)
    batches = chunks(srcs, args.batch_size)
    with torch.no_grad():
        eager = eager_greedy(srcs, model, max_steps)
        batched, per_batch = [], []
        for chunk in batches:
            batched += batch_greedy(chunk, model, max_steps)
            per_batch.append((db.stats(), chunk))
        padded = [out for chunk in batches for out in greedy_padded(model, chunk, max_steps)]

    same = sum(b == e for b, e in zip(batched, eager))
    same_padded = sum(p == e for p, e in zip(padded, eager))
    exact = sum(e == s[::-1] for e, s in zip(eager, srcs))
    tokens = sum(len(s) for s in srcs)
    right = sum(sum(a == b for a, b in zip(e, s[::-1])) for e, s in zip(eager, srcs))
    print(f"\ngreedy decoding of {len(srcs)} held-out sequences: exact reversal "
          f"{exact / len(srcs):.1%}, token accuracy {right / tokens:.1%}")
    print(f"batched == eager decoded sequences: {same}/{len(srcs)}"
          f"{'  (exact agreement)' if same == len(srcs) else '  MISMATCH'}; "
          f"hand-batched padded == eager: {same_padded}/{len(srcs)}")

    print(f"\nbatched calls per minibatch of {args.batch_size} (decoding: one step = constant, "
          "Embedding, GRUCell, Linear, argmax, then the read):")
    print(f"  {'examples':>8} {'enc+dec steps':>14} {'longest':>8} {'rounds':>7} "
          f"{'nodes':>7} {'batches':>8} {'examples x steps / batches':>27}")
    for k, (stats, chunk) in enumerate(per_batch):
        start = k * args.batch_size
        dec = [min(len(o) + 1, max_steps) for o in eager[start:start + len(chunk)]]
        steps = sum(len(s) for s in chunk) + sum(dec)
        longest = max(len(s) + d for s, d in zip(chunk, dec))
        print(f"  {len(chunk):8d} {steps:14d} {longest:8d} {stats.rounds:7d} {stats.nodes:7d} "
              f"{stats.batches:8d} {steps / stats.batches:27.1f}")

    # -- speed: interleaved reps, same data and weights ------------------------------------
    def runner(fn, size):
        parts = chunks(srcs, size)

        def run():
            for chunk in parts:
                fn(chunk)
        return run

    sizes = [int(x) for x in args.speed_batch_sizes.split(",") if x]
    contenders = {"eager per-sequence": runner(lambda c: eager_greedy(c, model, max_steps),
                                               len(srcs))}
    for size in sizes:
        contenders[f"dynbatch, minibatch {size}"] = runner(
            lambda c: batch_greedy(c, model, max_steps), size)
    for size in sizes:
        contenders[f"hand-batched padded, {size}"] = runner(
            lambda c: greedy_padded(model, c, max_steps), size)
    times = {name: [] for name in contenders}
    with torch.no_grad():
        for fn in contenders.values():          # warm-up
            fn()
        for _ in range(args.reps):
            for name, fn in contenders.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    base = len(srcs) / statistics.median(times["eager per-sequence"])
    print(f"\ninference speed on {len(srcs)} sequences, median of {args.reps} interleaved reps "
          f"({args.threads} thread(s)):")
    for name, ts in times.items():
        rate = len(srcs) / statistics.median(ts)
        print(f"  {name:28s} {rate:8.0f} sequences/s   x{rate / base:5.2f} vs eager")


if __name__ == "__main__":
    main()
