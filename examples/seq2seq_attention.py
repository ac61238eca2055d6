"""An encoder-decoder with dot-product attention, written for ONE sequence, batched by dynbatch.

Task: reverse a string of digits, lengths 3 to 30 (generated; every run makes the same
data from --seed). The model is what one writes for one example, with no padding and no
masks: an `nn.GRU` encoder over the source (L, d), a `nn.GRUCell` decoder, and at every
step dot-product attention over the source (`enc @ h`, `softmax(scores, 0)`,
`weights @ enc`). Trained with teacher forcing per example under `@db.batched`: the
encoder runs as one packed call over every length in the minibatch, each decoder step's
attention as one call over all the sources however long (rules/ragged.py). Greedy decoding
reads `int(logits.argmax())` at every step: each example waits at its read while the
others run, and all the waiting ones continue together.

The script checks that dynbatch and eager compute the same losses and gradients (float64,
same weights), trains for --seconds, reports exact-match and per-digit accuracy on
held-out strings, batched calls against example-steps, and the speed of a training step
against the eager loop on the same minibatches.

    python examples/seq2seq_attention.py                 # ~2 minutes on 2 CPU cores
    python examples/seq2seq_attention.py --seconds 20    # shorter training
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import dynbatch as db  # noqa: E402

DIGITS, BOS, EOS = 10, 10, 11
VOCAB = 12


class Seq2Seq(nn.Module):
    """Encoder-decoder with dot-product attention over one source sequence."""

    def __init__(self, embed: int, hidden: int) -> None:
        super().__init__()
        self.src_embedding = nn.Embedding(VOCAB, embed)
        self.encoder = nn.GRU(embed, hidden)
        self.tgt_embedding = nn.Embedding(VOCAB, embed)
        self.decoder = nn.GRUCell(embed, hidden)
        self.out = nn.Linear(2 * hidden, VOCAB)

    def encode(self, source: list[int]):
        states, last = self.encoder(self.src_embedding(torch.tensor(source)))
        return states, last[0]              # (L, hidden), (hidden,)

    def step(self, enc, h, token: int):
        """One decoder step from the previous token: new state and next-token logits."""
        h = self.decoder(self.tgt_embedding(torch.tensor(token)), h)
        weights = torch.softmax(enc @ h, dim=0)         # attention over the L source steps
        context = weights @ enc
        return h, self.out(torch.cat([h, context]))

    def forward(self, source: list[int], target: list[int]):
        """Cross-entropy summed over the target and EOS, with teacher forcing."""
        enc, h = self.encode(source)
        losses, token = [], BOS
        for y in target + [EOS]:
            h, logits = self.step(enc, h, token)
            losses.append(F.cross_entropy(logits, torch.tensor(y)))
            token = y
        return torch.stack(losses).sum()

    def greedy(self, source: list[int], limit: int) -> list[int]:
        enc, h = self.encode(source)
        out, token = [], BOS
        for _ in range(limit):
            h, logits = self.step(enc, h, token)
            token = int(logits.argmax())            # a read: waits for the batch
            if token == EOS:
                break
            out.append(token)
        return out


@db.batched
def loss_of(example, model):
    return model(*example)


@db.batched
def decode(example, model, limit):
    return torch.tensor(model.greedy(example[0], limit))


def make_data(n: int, lo: int, hi: int, rng: random.Random) -> list[tuple[list, list]]:
    out = []
    for _ in range(n):
        source = [rng.randrange(DIGITS) for _ in range(rng.randint(lo, hi))]
        out.append((source, source[::-1]))
    return out


def equality_check(model, examples) -> dict[str, float]:
    """Max abs difference of losses and gradients, dynbatch against eager, float64."""
    m = Seq2Seq(model.src_embedding.embedding_dim, model.decoder.hidden_size).double()
    m.load_state_dict(model.state_dict())
    eager = torch.stack([m(*e) for e in examples])
    grads_eager = torch.autograd.grad(eager.sum(), list(m.parameters()))
    batched = torch.stack(loss_of(examples, m))
    grads = torch.autograd.grad(batched.sum(), list(m.parameters()))
    return {"loss": (batched - eager).abs().max().item(),
            "grad": max((a - b).abs().max().item() for a, b in zip(grads, grads_eager))}


def accuracy(model, examples, batch: int = 128) -> tuple[float, float]:
    """(exact-match, per-digit) accuracy of greedy decoding."""
    exact = digits = total = 0
    with torch.no_grad():
        for start in range(0, len(examples), batch):
            chunk = examples[start:start + batch]
            for out, (_, target) in zip(decode(chunk, model, 32), chunk):
                got = out.tolist()
                exact += got == target
                digits += sum(a == b for a, b in zip(got, target))
                total += len(target)
    return exact / max(1, len(examples)), digits / max(1, total)


def speeds(model, examples, batch: int, rounds: int) -> dict[str, float]:
    """Examples/s of a training step (forward + backward), eager and dynbatch interleaved
    on the same minibatches; medians."""
    times: dict[str, list[float]] = {"eager": [], "dynbatch": []}
    for k in range(rounds):
        chunk = examples[k * batch:(k + 1) * batch]
        for name in times:
            t0 = time.perf_counter()
            losses = [model(*e) for e in chunk] if name == "eager" else loss_of(chunk, model)
            torch.stack(losses).sum().backward()
            times[name].append(len(chunk) / (time.perf_counter() - t0))
    model.zero_grad()
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--min-len", type=int, default=3)
    ap.add_argument("--max-len", type=int, default=30)
    ap.add_argument("--train", type=int, default=20000, help="training strings")
    ap.add_argument("--test", type=int, default=500, help="held-out strings")
    ap.add_argument("--embed-dim", type=int, default=32)
    ap.add_argument("--hidden-dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.005, help="Adam learning rate")
    ap.add_argument("--seconds", type=float, default=90.0, help="training time budget")
    ap.add_argument("--epochs", type=int, default=100, help="at most this many epochs")
    ap.add_argument("--check", type=int, default=16, help="strings in the equality check")
    ap.add_argument("--speed-rounds", type=int, default=3, help="minibatches timed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1; 0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()} (--threads N; 0 keeps torch's default)")
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    train = make_data(args.train, args.min_len, args.max_len, rng)
    test = make_data(args.test, args.min_len, args.max_len, rng)
    model = Seq2Seq(args.embed_dim, args.hidden_dim)
    result: dict = {"args": vars(args)}

    diffs = result["max_abs_diff"] = equality_check(model, train[:args.check])
    print(f"same weights, {args.check} strings, float64: max abs difference dynbatch vs "
          f"eager per example: loss {diffs['loss']:.1e}, grads {diffs['grad']:.1e}")

    optim = torch.optim.Adam(model.parameters(), lr=args.lr)
    deadline = time.perf_counter() + args.seconds
    result["epochs"] = []
    epoch = 0
    while epoch < args.epochs and time.perf_counter() < deadline:
        epoch += 1
        rng.shuffle(train)
        total, seen, tokens, t_train = 0.0, 0, 0, 0.0
        for start in range(0, len(train), args.batch):
            chunk = train[start:start + args.batch]
            t0 = time.perf_counter()
            optim.zero_grad()
            steps = sum(len(t) + 1 for _, t in chunk)
            loss = torch.stack(loss_of(chunk, model)).sum() / steps   # mean over steps
            loss.backward()
            optim.step()
            t_train += time.perf_counter() - t0
            total += loss.item() * steps
            seen += len(chunk)
            tokens += steps
            if time.perf_counter() >= deadline:
                break
        exact, per_digit = accuracy(model, test)
        row = {"epoch": epoch, "examples": seen, "loss": total / max(1, tokens),
               "examples_per_s": seen / max(t_train, 1e-9), "exact": exact,
               "per_digit": per_digit}
        result["epochs"].append(row)
        print(f"epoch {epoch}: {seen} strings, loss/step {row['loss']:.3f}, "
              f"{row['examples_per_s']:.0f} strings/s (dynbatch training step), held-out "
              f"exact match {exact:.3f}, per digit {per_digit:.3f}", flush=True)

    speed = result["speed"] = speeds(model, train, args.batch, args.speed_rounds)
    s = db.stats()
    steps = sum(len(t) + 1 for _, t in train[(args.speed_rounds - 1) * args.batch:
                                             args.speed_rounds * args.batch])
    result["last_stats"] = {"nodes": s.nodes, "batches": s.batches, "fallbacks": s.fallbacks,
                            "decoder_steps": steps}
    print(f"training step (forward+backward), minibatch {args.batch}, strings/s: eager per "
          f"example {speed['eager']:.0f}, dynbatch {speed['dynbatch']:.0f} "
          f"({speed['dynbatch'] / speed['eager']:.1f}x eager)")
    print(f"dynbatch, last minibatch: {steps} decoder steps over {args.batch} strings, "
          f"{s.nodes} nodes in {s.batches} batched calls, {s.fallbacks} per-example "
          f"fallbacks")
    print("\n".join(s.table().splitlines()[:26]))
    return result


if __name__ == "__main__":
    main()
