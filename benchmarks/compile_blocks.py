"""Blocks with ``compile=True`` against the same blocks replayed as plain Python, in one
process, on the same minibatches with the same weights.

    python benchmarks/compile_blocks.py                       # sst128, B=64 and 256, train
    python benchmarks/compile_blocks.py --mode infer --backend aot_eager --rounds 9

The model is the binary Tree-LSTM of the sst128 task (embedding and hidden 128, a loss on
every node) with its leaf cell, inner cell and node loss marked as blocks (tasks.py's
``BlocksBinaryTreeLSTM``); the compiled form marks the same three functions with
``db.block(..., compile={"backend": ...})``. SST train trees where ../shared/data/sst (or
$DYNBATCH_SST_DIR) has them, else generated trees of SST's sizes. 1 torch thread.

First the one-time cost: dynamo's caches are emptied and inductor's on-disk cache points at
a new, empty directory (``--warm-cache`` keeps the usual one), then each form runs its
first minibatch at each size, the smaller size first: the compiled form's first step
includes compiling (forward, and in training the backward at its first use), and its
later first steps show whether a new batch size compiles again. Then every minibatch of
both forms runs once more to warm up, and each round runs every minibatch with both
forms back to back, the order alternating. Reported per size: the median step (wall ms,
``time.perf_counter``) of each form with its quartiles, trees per second, and the figure
to quote: the median over (round, minibatch) pairs of the compiled / plain step-time
ratio, with quartiles and range. Below 1.00 the compiled form is faster.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import dynbatch as db  # noqa: E402
from benchmarks import tasks as T  # noqa: E402
from dynbatch.models import BinaryTreeLSTM  # noqa: E402

BLOCKS = ("leaf", "node", "node_loss")
FORMS = ("plain", "compiled")


def compiled_class(options: dict) -> type:
    """tasks.py's BlocksBinaryTreeLSTM, its blocks compiled with ``options``."""
    return type("CompiledBlocksBinaryTreeLSTM", (BinaryTreeLSTM,),
                {k: db.block(getattr(BinaryTreeLSTM, k), compile=options) for k in BLOCKS})


def generated_trees(n: int, vocab: int, seed: int = 0) -> list:
    """Binary trees of 1-45 leaves (SST train: 1-52, 19 on average), a label on every
    node, as the sst128 task's trees are."""
    rng = random.Random(seed)

    def tree(leaves: int) -> T.Tree:
        if leaves == 1:
            return T.Tree(rng.randrange(vocab), (), rng.randrange(5))
        k = rng.randint(1, leaves - 1)
        return T.Tree(0, (tree(k), tree(leaves - k)), rng.randrange(5))
    return [tree(min(45, max(1, int(rng.gauss(19, 9))))) for _ in range(n)]


def load(args) -> tuple[list, int, str]:
    need = max(args.sizes) * args.minibatches
    try:
        task = T.load_task("sst128", limit=need, sst_dir=T.sst_dir(args.sst_dir))
        return task.examples, task.vocab_size, task.source
    except T.DataMissing as err:
        print(f"{err}; using generated trees")
        return generated_trees(need, 16000), 16000, f"{need} generated trees"


def per_example(mode: str):
    if mode == "train":
        return db.batched(lambda tree, model: model(tree))
    return db.batched(lambda tree, model: model.root_logits(tree))


def make_step(fn, mode: str):
    def step(model, batch) -> float:
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        if mode == "infer":
            with torch.no_grad():
                fn(batch, model)
        else:
            torch.stack(fn(batch, model)).sum().backward()
        return time.perf_counter() - t0
    return step


def agree(models: dict, fn, batch, mode: str) -> float:
    """Max abs difference of the two forms' outputs (and gradients) on ``batch``."""
    flats = []
    for model in models.values():
        model.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(mode == "train"):
            out = torch.stack(fn(batch, model)).reshape(-1)
        if mode == "train":
            out.sum().backward()
            out = torch.cat([out.detach()] + [p.grad.reshape(-1) for p in
                                              models["plain"].parameters()
                                              if p.grad is not None])
        flats.append(out.detach())
    return (flats[0] - flats[1]).abs().max().item()


def quartiles(xs: list) -> tuple[float, float]:
    return tuple(statistics.quantiles(xs, n=4)[::2]) if len(xs) > 1 else (xs[0], xs[0])


def compiled_frames() -> int:
    return torch._dynamo.utils.counters["frames"]["ok"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="64,256", help="minibatch sizes, comma-separated")
    ap.add_argument("--minibatches", type=int, default=2, help="per size")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--mode", choices=("train", "infer"), default="train")
    ap.add_argument("--backend", default="inductor", help="torch.compile's backend")
    ap.add_argument("--warm-cache", action="store_true",
                    help="keep inductor's usual on-disk cache (default: a new, empty one)")
    ap.add_argument("--sst-dir", default=None,
                    help="default: $DYNBATCH_SST_DIR, else ../shared/data/sst")
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args(argv)
    args.sizes = sorted(int(s) for s in args.sizes.split(","))
    torch.set_num_threads(1)
    cache = None
    if not args.warm_cache:
        cache = tempfile.mkdtemp(prefix="dynbatch_inductor_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    try:
        run(args)
    finally:
        if cache is not None:
            shutil.rmtree(cache, ignore_errors=True)


def run(args) -> None:
    load_start = os.getloadavg()
    examples, vocab, source = load(args)
    torch.manual_seed(0)
    base = BinaryTreeLSTM(vocab, 128, 128, 5)
    models = {"plain": T._to_blocks(base), "compiled": copy.copy(base)}
    models["compiled"].__class__ = compiled_class({"backend": args.backend})
    fn = per_example(args.mode)
    step = make_step(fn, args.mode)
    batches = {b: T.minibatches(examples, b, args.minibatches) for b in args.sizes}
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()

    first: dict = {}        # (form, size) -> seconds of its first step
    frames: dict = {}       # size -> frames dynamo compiled in that size's first steps
    for b in args.sizes:
        before = compiled_frames()
        for form in FORMS:
            first[form, b] = step(models[form], batches[b][0])
        frames[b] = compiled_frames() - before
    diff = agree(models, fn, batches[args.sizes[0]][0], args.mode)
    for b in args.sizes:                     # warm-up: every minibatch, both forms
        for batch in batches[b]:
            for form in FORMS:
                step(models[form], batch)
    warm_frames = compiled_frames()
    times = {(form, b): [] for form in FORMS for b in args.sizes}
    ratios: dict = {b: [] for b in args.sizes}
    for r in range(args.rounds):
        for b in args.sizes:
            for i, batch in enumerate(batches[b]):
                pair = {}
                for form in (FORMS if (r + i) % 2 == 0 else FORMS[::-1]):
                    pair[form] = step(models[form], batch)
                    times[form, b].append(pair[form])
                ratios[b].append(pair["compiled"] / pair["plain"])
    later = compiled_frames() - warm_frames
    load_end = os.getloadavg()

    ms = 1e3
    loads = " ".join(f"{x:.2f}" for x in load_start), " ".join(f"{x:.2f}" for x in load_end)
    print(f"compiled blocks ({args.backend}) vs plain blocks: binary Tree-LSTM 128/128, "
          f"{args.mode}, {source}; {args.minibatches} minibatches x {args.rounds} rounds per "
          f"size, 1 thread; load {loads[0]} at start, {loads[1]} at end")
    print(f"  inductor cache: {'usual (warm)' if args.warm_cache else 'new, empty'}; "
          f"outputs{' and gradients' if args.mode == 'train' else ''} of the two forms "
          f"agree to {diff:.2g} (max abs diff, float32)")
    out = {"args": vars(args), "source": source, "load_start": load_start,
           "load_end": load_end, "max_abs_diff": diff, "sizes": {}}
    for b in args.sizes:
        row = out["sizes"][b] = {}
        print(f"  B={b}: first step plain {first['plain', b] * ms:.0f} ms, compiled "
              f"{first['compiled', b] * ms:.0f} ms ({frames[b]} frames compiled)")
        for form in FORMS:
            xs = times[form, b]
            med, (q1, q3) = statistics.median(xs), quartiles(xs)
            row[form] = {"step_ms_median": med * ms, "q1": q1 * ms, "q3": q3 * ms,
                         "trees_per_s": b / med, "first_step_ms": first[form, b] * ms}
            print(f"    {form:8s} step median {med * ms:7.1f} ms (IQR {q1 * ms:.1f}-"
                  f"{q3 * ms:.1f}), {b / med:6.0f} trees/s")
        xs = ratios[b]
        med, (q1, q3) = statistics.median(xs), quartiles(xs)
        row["ratio"] = {"median": med, "q1": q1, "q3": q3, "min": min(xs), "max": max(xs),
                        "pairs": len(xs)}
        print(f"    compiled/plain step time: median {med:.3f} (IQR {q1:.3f}-{q3:.3f}, "
              f"range {min(xs):.3f}-{max(xs):.3f}) over {len(xs)} pairs")
        # the compiled form's first step beyond its usual one, less what plain's first
        # step costs beyond its usual one (signatures made, first calls)
        row["one_time_compile_ms"] = (first["compiled", b] - first["plain", b]) * ms - \
            row["compiled"]["step_ms_median"] + row["plain"]["step_ms_median"]
        if frames[b]:
            print(f"    one-time cost of compiling, beyond plain's own first step: "
                  f"{row['one_time_compile_ms']:.0f} ms")
        else:
            print("    nothing compiled at this size: the code compiled before served it")
    print(f"  frames compiled after the first steps: {warm_frames - sum(frames.values())} "
          f"in warm-up, {later} in the timed rounds")
    out.update(frames_first=frames, frames_warm_up=warm_frames - sum(frames.values()),
               frames_timed=later)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
