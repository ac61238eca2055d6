"""Where a training step's peak resident memory comes from, phase by phase.

    python benchmarks/memory_phases.py                       # SST128 per-op, B=256
    python benchmarks/memory_phases.py --impl hand
    python benchmarks/memory_phases.py --impl dynbatch-blocks-agenda --batch 64
    python benchmarks/memory_phases.py --warm 64 --steps 4     # as bench.py's B=256 figures

scripts/bench.py measures one figure per implementation: the peak resident size (VmHWM)
of a training step over the process's base. This splits it: the resident size (VmRSS) and
the high-water mark since the step began, both over the base, when tracing ends (dynbatch:
the graph is recorded, nothing has run), when execution ends, when the forward returns
(the run has closed and dropped its graph), after the backward pass and after Adam; for
three (``--steps``) consecutive minibatches, as the first step also pays for what later ones
reuse. bench.py measures its sizes in one process, ascending: ``--warm 64`` first runs
eight B=64 steps, unmarked, as it does before its B=256 figures.
Same settings as bench.py's memory workers (1 thread; glibc's mmap threshold fixed, set
below before torch loads, so that resident memory follows live memory). Linux only.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise SystemExit(f"no {field} in /proc/self/status: this tool needs Linux")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="sst128", choices=("sst128", "sst300", "ast", "tagger"))
    ap.add_argument("--impl", default="dynbatch-agenda")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="steps marked")
    ap.add_argument("--warm", type=int, default=0,
                    help="first run 8 unmarked training steps at this minibatch size")
    ap.add_argument("--limit", type=int, default=1024, help="examples loaded")
    ap.add_argument("--tiny", action="store_true", help="tiny model dimensions (for tests)")
    ap.add_argument("--sst-dir", default=None,
                    help="SST directory (default $DYNBATCH_SST_DIR or ../shared/data/sst)")
    args = ap.parse_args(argv)
    import torch

    from benchmarks import harness as H
    from benchmarks import tasks as T
    from dynbatch import session
    torch.set_num_threads(1)
    task = T.load_task_or_exit(args.task, limit=args.limit, sst_dir=T.sst_dir(args.sst_dir),
                               tiny=args.tiny)
    runner = H.make_runner(task.name, args.impl, T.make_model(task))
    runner.train_step(task.examples[:1])
    if args.warm:
        for batch in T.minibatches(task.examples, args.warm, 8):
            runner.train_step(batch)
    marks = []

    def mark(name):
        marks.append((name, _status_mb("VmRSS"), _status_mb("VmHWM")))

    # A run executes what is pending when a result or a read needs it (session.Run.execute:
    # at the end of the recording, final=True, and at each read of a value): marked before
    # (the graph is recorded, that part has not run) and after.
    execute = session.Run.execute

    def phases(run, wanted=(), final=False):
        mark("traced")
        execute(run, wanted, final)
        mark("executed")
    session.Run.execute = phases
    warm = f", after 8 steps at B={args.warm}" if args.warm else ""
    print(f"{task.name} {args.impl}, training B={args.batch}{warm}, 1 thread: MB over the "
          f"base (resident now / high-water mark since the step began)")
    try:
        for k, batch in enumerate(T.minibatches(task.examples, args.batch, args.steps)):
            gc.collect()
            H.reset_peak_rss()
            marks.clear()
            base = _status_mb("VmRSS")
            runner.opt.zero_grad(set_to_none=True)
            loss = runner.impl.losses(runner.model, batch).sum()
            mark("forward returned")
            loss.backward()
            del loss
            mark("backward")
            runner.opt.step()
            mark("Adam")
            print(f"  step {k + 1} (base {base:.0f} MB): " + "; ".join(
                f"{name} {rss - base:+.1f} / {hwm - base:+.1f}" for name, rss, hwm in marks))
    finally:
        session.Run.execute = execute


if __name__ == "__main__":
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    if os.environ.get("_DYNBATCH_MEMORY_PHASES") is None:     # glibc reads it at start-up
        os.environ["_DYNBATCH_MEMORY_PHASES"] = "1"
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        os.execv(sys.executable, [sys.executable, *sys.argv])
    main()
