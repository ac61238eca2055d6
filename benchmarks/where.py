"""Where a whole training (or inference) step goes, by a sampling profiler: the backward
pass, the optimizer, the batched torch work, and dynbatch's own Python (tracing the model,
scheduling, planning, the executor's bookkeeping, a run's set-up and close).

    pip install py-spy                  # or: pip install -e .[profile]
    python benchmarks/where.py          # SST128 blocks form, B=64, training, 1 thread
    python benchmarks/where.py --impl hand --mode infer --seconds 20
    python benchmarks/where.py --task ast --impl dynbatch-agenda --raw samples.txt
    python benchmarks/where.py --from-raw samples.txt     # sort saved samples again

It runs the benchmark's own runner (scripts/bench.py's: the model, its Adam, the same
minibatches) in a loop and lets py-spy sample this process for ``--seconds`` once it is
warm, so imports and first calls are left out. Unlike cProfile it adds no cost per Python
call, which would inflate exactly the per-node Python being looked for. Shares of the
samples, not milliseconds: compare two implementations by their shares of their own step,
and take milliseconds from scripts/bench.py or benchmarks/time_split.py.

A sample is sorted by the files on its stack, not by the engine's function names, so
the engine may be rearranged freely (NOTE [sorting samples] below).
"""
from __future__ import annotations

import argparse
import builtins
import collections
import functools
import keyword
import linecache
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CATEGORIES = ("backward", "optimizer",
              "dynbatch: trace, model code", "dynbatch: trace, recording",
              "dynbatch: schedule", "dynbatch: plan",
              "dynbatch: execute, gathering inputs (torch)", "batched torch work",
              "dynbatch: execute bookkeeping",
              "dynbatch: run set-up, switching examples, results, close",
              "forward (not dynbatch)")

# NOTE [sorting samples]: py-spy records Python frames only (its --native mode cannot
# unwind the greenlets in which a run traces its examples), each as (function, file, line).
# - In the step: below this tool's ``step_loop``, or in a stack whose outermost frame is
#   the engine's (an example traced in its own greenlet starts there). Else left out.
# - ``backward`` (autograd's engine) and ``optimizer`` (torch/optim) by torch's own frames.
# - The engine's stages by module: the innermost frame in one of ``STAGES`` decides.
#   Executing splits into the torch work of gathering inputs, the batched calls' torch
#   work, and the executor's own Python, by the innermost frame (``torch_work``).
# - Otherwise a sample in the per-example code (a frame of neither the engine, torch nor
#   the standard library below the outermost engine frame, or a greenlet's stack) is
#   tracing: the model code's own, or recording when the innermost frame is the engine's.
# - Other samples with an engine frame: the run's set-up, its examples' switching, its
#   results and its close. No engine frame at all: forward code that is not dynbatch's.
STAGES = {"dynbatch/schedule.py": "schedule", "dynbatch/plan.py": "plan",
          "dynbatch/execute.py": "execute", "dynbatch/gather.py": "gather"}
NOT_ENGINE = ("dynbatch/models/", "dynbatch/data/")     # the reference models and data
_STDLIB = Path(sysconfig.get_paths()["stdlib"])


def _frames(stack: str) -> list[tuple[str, str, int]]:
    """(function, file, line) of each Python frame of a py-spy raw stack, outermost first;
    the function by its own name (``main.<locals>.step_loop`` -> ``step_loop``); the
    file as py-spy shortens it (``dynbatch/plan.py``, ``torch/nn/functional.py``, or a
    generated file such as ``<dynbatch block BinaryTreeLSTM.node>``)."""
    out = []
    for frame in stack.split(";"):
        name, sep, where = frame.rpartition(" (")
        path, colon, line = where.rstrip(")").rpartition(":")
        if sep and colon and line.isdigit():
            out.append((name.rsplit(".", 1)[-1], path.replace("\\", "/").lstrip("/"),
                        int(line)))
    return out


def _engine(path: str) -> bool:
    """dynbatch's own code: its package (not the models or data beside it), and the code
    it generates (``<dynbatch ...>``)."""
    if path.startswith("<dynbatch"):
        return True
    p = "/" + path
    return "/dynbatch/" in p and not any("/" + x in p for x in NOT_ENGINE)


def _torch(path: str) -> bool:
    return ("/" + path).find("/torch/") >= 0


@functools.lru_cache(maxsize=None)
def _stdlib(path: str) -> bool:
    return path.startswith("<") or (_STDLIB / path).is_file()


def _read_line(path: str, line: int) -> str:
    for base in (ROOT, Path("/")):
        text = linecache.getline(str(base / path), line)
        if text:
            return text
    return ""


# A call of something that is not Python's own: ``name(`` not a builtin, ``.name(`` not
# a method of Python's containers and strings (or also a Tensor method).
_CALLED = re.compile(r"(\.?)([A-Za-z_]\w*)\s*\(")
_BUILTINS = set(dir(builtins)) | set(keyword.kwlist)
_METHODS = {m for t in (dict, list, set, frozenset, tuple, str, bytes, int)
            for m in dir(t)} - set(dir(torch.Tensor))


def calls_out(text: str) -> bool:
    """Whether a line calls something other than Python's builtins and container methods:
    when the innermost frame sampled is on such a line, py-spy sees no Python frame below
    it, so the time is in a C function it called (in a batched run, mostly torch's)."""
    for dot, name in _CALLED.findall(text):
        if (name not in _METHODS) if dot else (name not in _BUILTINS):
            return True
    return False


def torch_work(frame, read_line=_read_line) -> bool:
    """Whether the innermost frame of a sample is in torch rather than in dynbatch's own
    Python: a frame not of the engine (torch's Python, a model), or an engine line that
    calls out (``calls_out``); a generated line whose text is unknown calls out."""
    _, path, line = frame
    if not _engine(path):
        return True
    text = read_line(path, line)
    return calls_out(text) if text else path.startswith("<")


def category(stack: str, read_line=_read_line) -> str | None:
    """The part of a step one sample of a py-spy raw stack belongs to (NOTE [sorting
    samples]); None for samples outside the timed loop (the profiler's first moments,
    other threads idling). ``read_line(file, line)``: the text of a line of source."""
    frames = _frames(stack)
    if not frames:
        return None
    names = [n for n, _, _ in frames]
    files = [f for _, f, _ in frames]
    greenlet = _engine(files[0])
    if "step_loop" not in names and not greenlet:
        return None
    if any(n == "_engine_run_backward" or (n == "backward" and "torch/autograd/" in f)
           for n, f in zip(names, files)):
        return "backward"
    if any("torch/optim/" in f for f in files):
        return "optimizer"
    engine = [k for k, f in enumerate(files) if _engine(f)]
    if not engine:
        return "forward (not dynbatch)"
    stage = next((STAGES[f] for f in reversed(files) if f in STAGES), None)
    if stage == "schedule":
        return "dynbatch: schedule"
    if stage == "plan":
        return "dynbatch: plan"
    if stage is not None:
        if not torch_work(frames[-1], read_line):
            return "dynbatch: execute bookkeeping"
        return ("dynbatch: execute, gathering inputs (torch)" if stage == "gather"
                else "batched torch work")
    user = any(not _engine(f) and not _torch(f) and not _stdlib(f)
               for f in files[engine[0] + 1:])
    if greenlet or user:
        return ("dynbatch: trace, recording" if _engine(files[-1])
                else "dynbatch: trace, model code")
    return "dynbatch: run set-up, switching examples, results, close"


def shares(raw_lines, read_line=_read_line) -> tuple[collections.Counter, int]:
    """Samples per category from py-spy's raw output (``stack count`` per line)."""
    counts: collections.Counter = collections.Counter()
    for line in raw_lines:
        stack, _, n = line.rstrip("\n").rpartition(" ")
        if not stack or not n.isdigit():
            continue
        c = category(stack, read_line)
        if c is not None:
            counts[c] += int(n)
    return counts, sum(counts.values())


def print_shares(counts, total, heading: str) -> None:
    print(f"{heading}: {total} samples; share of the step")
    for name in CATEGORIES:
        if counts[name]:
            print(f"  {100 * counts[name] / total:5.1f}%  {name}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="sst128", choices=("sst128", "sst300", "ast", "tagger"))
    ap.add_argument("--impl", default="dynbatch-blocks-agenda")
    ap.add_argument("--mode", choices=("train", "infer"), default="train")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--rate", type=int, default=250, help="samples per second")
    ap.add_argument("--raw", help="also keep py-spy's samples (stack count per line) here")
    ap.add_argument("--from-raw", help="sort the samples of an earlier --raw file instead "
                                       "of running anything (against the source as it "
                                       "is now: lines read must not have moved)")
    ap.add_argument("--sst-dir", default=None,
                    help="default: $DYNBATCH_SST_DIR, else ../shared/data/sst")
    args = ap.parse_args(argv)
    if args.from_raw:
        counts, total = shares(Path(args.from_raw).read_text().splitlines())
        if not total:
            sys.exit(f"no samples of a step loop in {args.from_raw}")
        return print_shares(counts, total, args.from_raw)
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

    def step_loop(until) -> int:            # (its name marks the samples of the step)
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
    print_shares(counts, total, f"{args.task} {args.impl} {args.mode}, B={args.batch}, "
                                f"1 thread: {steps} steps")


if __name__ == "__main__":
    main()
