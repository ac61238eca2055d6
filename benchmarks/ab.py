"""Old against new in ONE process: a revision's version of some dynbatch functions against
the working tree's, alternating on the same minibatches.

    python benchmarks/ab.py dynbatch.blocks:record_block --rev ffa9add~1
    python benchmarks/ab.py dynbatch.execute:_gather,_plan --mode infer --rounds 12

Two processes on this shared machine differ by more than most changes (the same code
ranges over 0.4-1.0x hand-batched from one round to the next), so a change of a few
percent cannot be seen by running the benchmark before and after. Here the functions named
(``module:function,function``) are taken from ``git show REV:module.py`` and compiled into
the live module's namespace, so both versions run on the same data, weights, caches and
allocator state; each minibatch runs once with each version, in alternating order. Only
module-level functions can be swapped, and only where callers look them up by name at call
time (as dynbatch's own modules do; a name imported into another dynbatch module is
swapped there too; the wrappers a run puts on hot torch functions, made by
``trace._hot_wrapper`` and ``trace._tensor_wrapper``, are made anew after a swap).
Figures: CPU ms per SST128 minibatch of the forward pass (the run's trace / schedule /
execute from ``db.stats()``), minimum, median, and the median of the per-minibatch
new/old ratios (the figure to quote).
"""
from __future__ import annotations

import argparse
import ast
import importlib
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import dynbatch as db  # noqa: E402
from benchmarks import tasks as T  # noqa: E402
from dynbatch import trace  # noqa: E402


def old_functions(spec: str, rev: str) -> list[tuple[types.ModuleType, str, object, object]]:
    """[(module, name, old function, new function)] for ``module:f1,f2`` at ``rev``."""
    module_name, _, names = spec.partition(":")
    module = importlib.import_module(module_name)
    path = module_name.replace(".", "/") + ".py"
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"],
                            capture_output=True, text=True, check=True).stdout
    wanted = names.split(",")
    found: dict = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and node.name in wanted:
            # the live module's globals, so it calls what the new code calls; the def
            # binds in ``found`` and leaves the live function in place
            exec(compile(ast.Module([node], []), f"<{rev}:{path}>", "exec"), vars(module),
                 found)
    missing = [n for n in wanted if n not in found]
    if missing:
        sys.exit(f"{', '.join(missing)}: no such module-level function in {rev}:{path}")
    return [(module, n, found[n], getattr(module, n)) for n in wanted]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("functions", nargs="+", help="module:function[,function...]")
    ap.add_argument("--rev", default="HEAD", help="where the old versions come from")
    ap.add_argument("--task", choices=T.TASKS, default="sst128")
    ap.add_argument("--impl", default="dynbatch-blocks-agenda")
    ap.add_argument("--mode", choices=("train", "infer"), default="train")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=8, help="passes over 4 minibatches")
    ap.add_argument("--sst-dir", default=None,
                    help="default: $DYNBATCH_SST_DIR, else ../shared/data/sst")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    swaps = [s for spec in args.functions for s in old_functions(spec, args.rev)]
    task = T.load_task_or_exit(args.task, limit=args.batch * 4,
                               sst_dir=T.sst_dir(args.sst_dir))
    impl = T.torch_impl(args.task, args.impl)
    if impl is None or not impl.uses_dynbatch:
        sys.exit(f"{args.impl} is not a dynbatch implementation of {args.task}")
    model = impl.prepare(T.make_model(task))
    batches = T.minibatches(task.examples, args.batch, 4)

    # dynbatch modules that imported a swapped function by name (``from .execute import
    # execute_pending``) get the swap too
    importers = [(m, swap) for swap in swaps for m in list(sys.modules.values())
                 if getattr(m, "__name__", "").startswith("dynbatch.") and m is not swap[0]
                 and getattr(m, swap[1], None) is swap[3]]

    def use(version: int) -> None:           # 2: old, 3: new
        for module, swap in importers:
            setattr(module, swap[1], swap[version])
        for swap in swaps:
            setattr(swap[0], swap[1], swap[version])
            if swap[0] is trace:    # a run patches torch with wrappers made once: make anew
                trace._HOT_WRAPPERS = None

    def forward(batch) -> tuple[float, ...]:
        t0 = time.process_time()
        if args.mode == "train":
            loss = impl.losses(model, batch).sum()
            elapsed = time.process_time() - t0
            loss.backward()
        else:
            with torch.no_grad():
                impl.infer(model, batch)
            elapsed = time.process_time() - t0
        s = db.stats()
        return elapsed, s.trace_s, s.schedule_s, s.execute_s

    times = {2: [], 3: []}
    try:
        for version in (2, 3):              # warm-up: first-call costs, caches
            use(version)
            for batch in batches:
                forward(batch)
        for r in range(args.rounds):
            for batch in batches:
                for version in ((2, 3) if r % 2 == 0 else (3, 2)):
                    use(version)
                    times[version].append(forward(batch))
    finally:
        use(3)
    print(f"{args.task} {args.impl} {args.mode}, B={args.batch}, {len(times[2])} minibatches each; "
          f"old = {args.rev}: {' '.join(args.functions)}; CPU ms per minibatch")
    for k, part in enumerate(("forward", "trace", "schedule", "execute")):
        old = [t[k] for t in times[2]]
        new = [t[k] for t in times[3]]
        ratio = statistics.median(b / a for a, b in zip(old, new) if a > 0)
        print(f"  {part:9s} old min {min(old) * 1e3:6.1f} median {statistics.median(old) * 1e3:6.1f}"
              f" | new min {min(new) * 1e3:6.1f} median {statistics.median(new) * 1e3:6.1f}"
              f" | new/old {ratio:.3f}")


if __name__ == "__main__":
    main()
