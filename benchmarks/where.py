"""Where a whole training (or inference) step goes, by a sampling profiler: the backward
pass, the optimizer, the batched torch work, and dynbatch's own Python (tracing the model,
scheduling, the executor's bookkeeping, a run's set-up and close).

    pip install py-spy                  # or: pip install -e .[profile]
    python benchmarks/where.py          # SST128 blocks form, B=64, training, 1 thread
    python benchmarks/where.py --impl hand --mode infer --seconds 20

It runs the benchmark's own runner (scripts/bench.py's: the model, its Adam, the same
minibatches) in a loop and lets py-spy sample this process for ``--seconds`` once it is
warm, so imports and first calls are left out. Unlike cProfile it adds no cost per Python
call, which would inflate exactly the per-node Python being looked for. Shares of the
samples, not milliseconds: compare two implementations by their shares of their own step,
and take milliseconds from scripts/bench.py or benchmarks/time_split.py.
"""
from __future__ import annotations

import argparse
import collections
import linecache
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_FRAME = re.compile(r"(.*) \((.*):(\d+)\)$")
CATEGORIES = ("backward", "optimizer", "batched torch work",
              "dynbatch: trace (model code and recording)", "dynbatch: schedule",
              "dynbatch: execute bookkeeping", "dynbatch: run set-up, results, close",
              "forward (not dynbatch)")


def _frames(stack: str) -> list[tuple[str, str, int]]:
    """(function, file, line) of each frame of a py-spy raw stack, outermost first; the
    function by its own name (``main.<locals>.step_loop`` -> ``step_loop``)."""
    out = []
    for frame in stack.split(";"):
        m = _FRAME.match(frame)
        if m:
            path = m.group(2).replace("\\", "/")     # py-spy shortens paths: torch/...
            out.append((m.group(1).rsplit(".", 1)[-1],
                        path if path[:1] == "/" else "/" + path, int(m.group(3))))
    return out


# A line of dynbatch's own that calls torch (a gather's index_select or cat, making an
# index tensor): py-spy sees no frame below it, so the sample counts as torch work when
# the line's text makes such a call.
_TORCH_CALL = re.compile(r"torch\.\w+\(|\.(index_select|index_add|split|unbind|new_zeros|to|"
                         r"view|reshape|transpose|movedim|sum|unsqueeze|expand)\(|"
                         r"_torch_tensor\(|\bmake\(|\bsrc\[")


def _calls_torch(path: str, line: int) -> bool:
    for base in (ROOT, Path("/")):
        text = linecache.getline(str(base / path.lstrip("/")), line)
        if text:
            return bool(_TORCH_CALL.search(text))
    return False


def category(stack: str) -> str | None:
    """The part of a step one sample of a py-spy raw stack belongs to; None for samples
    outside the timed loop (the profiler's first moments, other threads idling)."""
    frames = _frames(stack)
    files = [f for _, f, _ in frames]
    names = [n for n, _, _ in frames]
    in_step = any(n in ("step_loop", "trace_one") for n in names)
    if not in_step:
        return None
    if "_engine_run_backward" in names:
        return "backward"
    if any("/torch/optim/" in f for f in files):
        return "optimizer"
    leaf_name, leaf_file, leaf_line = frames[-1]
    dynbatch_leaf = "/dynbatch/" in leaf_file and leaf_name != "hot" and \
        not _calls_torch(leaf_file, leaf_line)          # (hot: a wrapped torch function)
    if "trace_one" in names and "execute_pending" not in names:
        return "dynbatch: trace (model code and recording)"
    if any(f.endswith("dynbatch/schedule.py") for f in files):
        return "dynbatch: schedule"
    if "execute_pending" in names:
        if dynbatch_leaf:
            return "dynbatch: execute bookkeeping"
        return "batched torch work"
    if any(f.endswith("dynbatch/api.py") for f in files):
        return "dynbatch: run set-up, results, close" if dynbatch_leaf else "batched torch work"
    return "forward (not dynbatch)"


def shares(raw_lines) -> tuple[collections.Counter, int]:
    """Samples per category from py-spy's raw output (``stack count`` per line)."""
    counts: collections.Counter = collections.Counter()
    for line in raw_lines:
        stack, _, n = line.rstrip("\n").rpartition(" ")
        if not stack or not n.isdigit():
            continue
        c = category(stack)
        if c is not None:
            counts[c] += int(n)
    return counts, sum(counts.values())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="sst128", choices=("sst128", "sst300", "ast", "tagger"))
    ap.add_argument("--impl", default="dynbatch-blocks-agenda")
    ap.add_argument("--mode", choices=("train", "infer"), default="train")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--rate", type=int, default=250, help="samples per second")
    ap.add_argument("--raw", help="also keep py-spy's samples (stack count per line) here")
    ap.add_argument("--sst-dir", default=None,
                    help="default: $DYNBATCH_SST_DIR, else ../shared/data/sst")
    args = ap.parse_args(argv)
    spy = shutil.which("py-spy")
    if spy is None:
        sys.exit("py-spy is not installed: pip install py-spy (or pip install -e .[profile])")
    from benchmarks import harness as H
    from benchmarks import tasks as T
    torch.set_num_threads(1)
    task = T.load_task_or_exit(args.task, limit=args.batch * 4,
                               sst_dir=T.sst_dir(args.sst_dir))
    runner = H.make_runner(args.task, args.impl, T.make_model(task))
    batches = T.minibatches(task.examples, args.batch, 4)
    step = runner.train_step if args.mode == "train" else runner.infer

    def step_loop(until) -> int:
        done = 0
        while until():
            step(batches[done % len(batches)])
            done += 1
        return done

    warm_up = iter(range(2 * len(batches)))
    step_loop(lambda: next(warm_up, None) is not None)           # not sampled
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "samples.txt"
        spy_proc = subprocess.Popen(
            [spy, "record", "--pid", str(os.getpid()), "--rate", str(args.rate),
             "--duration", str(max(1, round(args.seconds))), "--format", "raw",
             "--output", str(raw)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        steps = step_loop(lambda: spy_proc.poll() is None)
        err = spy_proc.stderr.read()
        if spy_proc.returncode != 0 or not raw.exists():
            sys.exit(f"py-spy could not sample this process (it needs permission to "
                     f"ptrace it; as a user: sudo, or kernel.yama.ptrace_scope=0):\n{err}")
        samples = raw.read_text()
    if args.raw:
        Path(args.raw).write_text(samples)
    counts, total = shares(samples.splitlines())
    if not total:
        sys.exit("py-spy took no samples of the step loop")
    print(f"{args.task} {args.impl} {args.mode}, B={args.batch}, 1 thread: {steps} steps, "
          f"{total} samples; share of the step")
    for name in CATEGORIES:
        if counts[name]:
            print(f"  {100 * counts[name] / total:5.1f}%  {name}")


if __name__ == "__main__":
    main()
