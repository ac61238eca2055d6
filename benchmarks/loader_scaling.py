#!/usr/bin/env python
"""What the main process still spends per training step when db.DataLoader plans ahead,
and how the step scales with the number of workers.

    python benchmarks/loader_scaling.py                 # sst128, B=64, 0/1/2/4 workers
    python benchmarks/loader_scaling.py --workers 1,2 --steps 12 --forms blocks

For each form (per-op code, blocks) and worker count w, one loader trains for ``--steps``
+ 8 w minibatches of SST trees (1 torch thread), and reports, over the last ``--steps``
// 2 of them (NOTE [steady state] in benchmarks/harness.py: the plans made side by side
while the first was awaited, up to 2 w, are consumed before that window), the mean step
(plans arrive in bursts: most steps find one waiting, a few wait long), and medians of
the main process's forward call (unpacking the plan, gathers, batched calls, results), split into unpacking
and executing; the forward's microseconds per batched call; backward and optimizer. The
inline ``@db.batched`` call (tracing and scheduling in the step) and hand-batched code run
(inline, and with its routing made in a DataLoader worker) on the same minibatches as
references, interleaved round by round.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import dynbatch as db  # noqa: E402
from benchmarks import handbatched as hb  # noqa: E402
from benchmarks import tasks as T  # noqa: E402


def steps_of(model, batches, forward) -> list[dict]:
    """Per step: seconds of the step, its forward, and the dynbatch stats."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    out, end = [], None
    for batch in batches:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = forward(model, batch).sum()
        t1 = time.perf_counter()
        stats = db.stats()
        loss.backward()
        opt.step()
        t2 = time.perf_counter()
        out.append({"step": None if end is None else t2 - end, "forward": t1 - t0,
                    "backward": t2 - t1, "unpack": stats.extra.get("unpack_s", 0.0),
                    "execute": stats.execute_s, "batches": stats.batches})
        end = t2
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", default="0,1,2,4")
    ap.add_argument("--forms", default="perop,blocks")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=16,
                    help="steps without workers; with w workers 8 w more")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--sst-dir", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    workers = [int(w) for w in args.workers.split(",")]
    B = args.batch
    most = args.steps + 8 * max(workers)
    task = T.load_task_or_exit("sst128", limit=B * most, sst_dir=T.sst_dir(args.sst_dir))
    idx = [list(range(k * B, (k + 1) * B)) for k in range(most)]
    trees = [[task.examples[i] for i in mb] for mb in idx[:args.steps]]
    loss = T._DB_FNS["tree_loss", "agenda"]
    rows: dict = {}

    def record(name, steps):
        rows.setdefault(name, []).extend(steps[-(args.steps // 2):])

    def hand_routed(model, routed):
        return hb.handbatched_binary_treelstm_loss(model, range(routed[0]), routed[1])

    for _ in range(args.rounds):
        record("hand", steps_of(T.make_model(task), trees,
                                hb.handbatched_binary_treelstm_loss))
        routing = torch.utils.data.DataLoader(task.examples, batch_sampler=idx[:args.steps + 8],
                                              num_workers=1,
                                              collate_fn=lambda b: (len(b),
                                                                    hb.binary_routing(b)))
        record("hand, routing in 1 worker", steps_of(T.make_model(task), routing,
                                                     hand_routed))
        for form in args.forms.split(","):
            prepare = T._to_blocks if form == "blocks" else (lambda m: m)
            record(f"{form} inline", steps_of(prepare(T.make_model(task)), trees,
                                              lambda m, b: torch.stack(loss(b, m))))
            for w in workers:
                model = prepare(T.make_model(task))
                loader = db.DataLoader(task.examples, loss, model,
                                       batch_sampler=idx[:args.steps + 8 * w], num_workers=w)
                record(f"{form} {w} worker{'s' if w != 1 else ''}",
                       steps_of(model, loader, lambda m, b: torch.stack(loss(b, m))))
    hand = statistics.median(r["step"] for r in rows["hand"])
    print(f"sst128, B={B}, 1 torch thread, {args.rounds} rounds; "
          f"ms over the last {args.steps // 2} steps of each run: the mean step, median phases\n")
    print("| form | step | × hand | forward | unpack | execute | µs per batched call "
          "(forward) | backward + Adam |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, rs in rows.items():
        med = {k: statistics.median(r[k] for r in rs if r[k] is not None)
               for k in ("forward", "backward", "unpack", "execute", "batches")}
        # the mean, not the median: with several workers plans arrive in bursts, so most
        # steps find one waiting and a few wait long; throughput is the mean
        med["step"] = statistics.fmean(r["step"] for r in rs)
        if name.startswith("hand"):     # no dynbatch call: its stats are another row's
            parts = "– | – | –"
        else:
            parts = (f"{1e3 * med['unpack']:.1f} | {1e3 * med['execute']:.1f} | "
                     f"{1e6 * med['forward'] / med['batches']:.0f}")
        print(f"| {name} | {1e3 * med['step']:.1f} | {hand / med['step']:.2f}× | "
              f"{1e3 * med['forward']:.1f} | {parts} | {1e3 * med['backward']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
