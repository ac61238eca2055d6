"""Does taking turns step by step steady the per-round ratios (NOTE [interleaving] in
harness.py)? Both ways of interleaving, on the same rounds, in one process:

    python benchmarks/interleaving.py                   # hand vs blocks, 9 rounds
    python benchmarks/interleaving.py --impl dynbatch-agenda --rounds 5

Each round times hand-batched and the dynbatch implementation both round by round (all of
one's minibatches, then all of the other's, as the harness does) and step by step
(minibatch k in both before minibatch k+1 in either, as bfe6651 tried), which way first
alternating from round to round. It prints, for each way, the median and the range of the
per-round ratios, and each implementation's median
round time: if a step were slowed by following the other implementation's step, the
step-by-step times would be the longer ones.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import harness as H  # noqa: E402
from benchmarks import tasks as T  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--impl", default="dynbatch-blocks-agenda")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--minibatches", type=int, default=4, help="per round")
    ap.add_argument("--sst-dir", default=None,
                    help="default: $DYNBATCH_SST_DIR, else ../shared/data/sst")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    per_round = args.batch * args.minibatches
    task = T.load_task_or_exit("sst128", limit=4 * per_round, sst_dir=T.sst_dir(args.sst_dir))
    model = T.make_model(task)
    names = ("hand", args.impl)
    runners = {n: H.make_runner(task.name, n, copy.deepcopy(model)) for n in names}
    rounds = H._rounds_data(task, args.batch, args.rounds, per_round)
    ex = task.examples
    for runner in runners.values():                 # warm-up, untimed
        runner.train_step([ex[i] for i in rounds[0][0]])
    times = {way: {n: [] for n in names} for way in ("round by round", "step by step")}
    for r, idx in enumerate(rounds):
        mbs = [[ex[i] for i in mb] for mb in idx]
        order = names if r % 2 == 0 else names[::-1]

        def round_by_round():
            for n in order:
                times["round by round"][n].append(H.run_round(runners[n], "train", mbs)[0])

        def step_by_step():
            total = dict.fromkeys(names, 0.0)
            for k, mb in enumerate(mbs):
                for n in (names if (r + k) % 2 == 0 else names[::-1]):
                    total[n] += H.run_round(runners[n], "train", [mb])[0]
            for n in names:
                times["step by step"][n].append(total[n])

        # which way goes first alternates too: a second pass over a round's trees
        # could find them warmer
        for way in ((round_by_round, step_by_step) if r % 2 == 0 else
                    (step_by_step, round_by_round)):
            way()
    print(f"sst128 training, B={args.batch}, {args.rounds} rounds of {args.minibatches} "
          f"minibatches; per-round ratio {args.impl} / hand-batched (throughput)")
    for way, t in times.items():
        ratios = sorted(h / d for h, d in zip(t["hand"], t[args.impl]))
        print(f"  {way:15s} median {statistics.median(ratios):.3f}, range "
              f"{ratios[0]:.3f}-{ratios[-1]:.3f}; median round: " +
              ", ".join(f"{n} {statistics.median(t[n]):.3f} s" for n in names))


if __name__ == "__main__":
    main()
