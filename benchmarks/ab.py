"""Old against new in ONE process: a revision's whole dynbatch package against the working
tree's, taking turns on the same minibatches with the same weights.

    python benchmarks/ab.py --rev REV                          # SST128, per-op code, train
    python benchmarks/ab.py --rev REV --impl blocks --mode infer --rounds 12
    python benchmarks/ab.py --rev REV --task ast --strategy depth --json ab.json

Why one process: two processes on this shared, noisy machine differ by more than most
changes do (the same code's speed swings from one round to the next), so a change of a
few percent cannot be seen by running a benchmark before and after it. Here
``git archive REV dynbatch`` is unpacked into a temporary directory (deleted at exit) as
the package ``dynbatch_ab_old``, its absolute ``dynbatch`` imports rewritten to that name,
and imported beside the live ``dynbatch``; the tool stops if any module of the copy
resolves to the live package. Only the public API is used (``batched``, ``block``,
``stats``), so either revision may lay its engine out in any way. The models, data and
minibatches come from the working tree; only the dynbatch wrapping (the ``batched``
function and, for ``--impl blocks``, a model class whose ``leaf``, ``node`` and
``node_loss`` are ``block``s) is built from each version. A step is the forward, plus for
``--mode train`` the backward of the summed losses. Both versions' outputs (and
gradients) on the first minibatch are compared before timing; then each version runs
every minibatch once to warm up, and each round runs every minibatch with both versions
back to back, the order alternating. Reported: wall ms per step (``time.perf_counter``),
CPU ms, the forward's trace / schedule / execute from ``stats()``, and the figure to
quote: the median over all (round, minibatch) pairs of the new/old step-time ratio, with
its quartiles and range.
"""
from __future__ import annotations

import argparse
import ast
import copy
import importlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils._pytree import tree_leaves

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import dynbatch as db  # noqa: E402
from benchmarks import tasks as T  # noqa: E402
from dynbatch.models import BinaryTreeLSTM  # noqa: E402

OLD = "dynbatch_ab_old"
PHASES = ("forward_s", "trace_s", "schedule_s", "execute_s", "backward_s")


def git(*args: str) -> str:
    done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


def rewrite_imports(source: str, name: str = OLD) -> str:
    """``source`` with its absolute imports of ``dynbatch`` naming ``name`` instead;
    code that names ``dynbatch`` after ``import dynbatch[.x]`` finds ``name`` there."""
    lines = source.splitlines(keepends=True)
    for node in ast.walk(ast.parse(source)):
        i = getattr(node, "lineno", 0) - 1
        if isinstance(node, ast.ImportFrom) and node.level == 0 and \
                re.match(r"dynbatch(\.|$)", node.module or ""):
            lines[i] = re.sub(r"\bfrom(\s+)dynbatch\b", rf"from\1{name}", lines[i], count=1)
        elif isinstance(node, ast.Import):
            lines[i] = re.sub(r"(?<![\w.])dynbatch(?=\.|\s|,|$)", name, lines[i])
            if any(a.asname is None and re.match(r"dynbatch(\.|$)", a.name) for a in node.names):
                # ``import dynbatch[.x]`` binds ``dynbatch``: so does the rewritten code
                indent = re.match(r"\s*", lines[i]).group()
                end = node.end_lineno - 1
                lines[end] = lines[end].rstrip("\n") + f"\n{indent}dynbatch = {name}\n"
    return "".join(lines)


def load_old(rev: str, tmp: Path):
    """The package ``dynbatch/`` at ``rev``, imported as ``dynbatch_ab_old`` from ``tmp``;
    exits unless every module of it comes from ``tmp`` and none refers to the live one."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "dynbatch"],
                             capture_output=True)
    if archive.returncode:
        sys.exit(f"git archive {rev} dynbatch: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive.stdout, check=True)
    pkg_dir = tmp / OLD
    (tmp / "dynbatch").rename(pkg_dir)
    for path in pkg_dir.rglob("*.py"):
        path.write_text(rewrite_imports(path.read_text()))
    sys.path.insert(0, str(tmp))
    before = set(sys.modules)
    old = importlib.import_module(OLD)
    bad = [f"importing it imported the live {m}" for m in set(sys.modules) - before
           if re.match(r"dynbatch(\.|$)", m)]
    for name, module in list(sys.modules.items()):
        if name == OLD or name.startswith(OLD + "."):
            where = str(Path(getattr(module, "__file__", None) or "?").resolve())
            if not where.startswith(str(pkg_dir.resolve()) + os.sep):
                bad.append(f"{name} from {where}")
            bad += [f"{name}.{k} is the live {v.__name__}" for k, v in vars(module).items()
                    if type(v) is type(os) and re.match(r"dynbatch(\.|$)", v.__name__)]
    if not str(Path(db.__file__).resolve()).startswith(str(ROOT) + os.sep):
        bad.append(f"the live dynbatch is {db.__file__}, not the working tree's")
    if bad:
        sys.exit("the old copy is not separate from the live package: " + "; ".join(bad))
    return old


# the code for ONE example, by (task, mode); the models are the working tree's
PER_EXAMPLE = {
    ("tree", "train"): lambda tree, model: model(tree),
    ("sst", "infer"): lambda tree, model: model.root_logits(tree),
    ("ast", "infer"): lambda tree, model: model.logits(tree),
    ("tagger", "train"): lambda example, model: model(example[0], example[1]),
    ("tagger", "infer"): lambda example, model: model.predict_logits(example[0]),
}


def version_step(pkg, args, model):
    """One step of ``pkg``'s wrapping of the shared ``model``: returns its raw output."""
    if args.impl == "blocks":
        cls = type(f"BlocksBinaryTreeLSTM_{pkg.__name__}", (BinaryTreeLSTM,),
                   {k: pkg.block(getattr(BinaryTreeLSTM, k)) for k in ("leaf", "node",
                                                                       "node_loss")})
        model = copy.copy(model)          # shares the parameters; only the class differs
        model.__class__ = cls
    kind = args.task if args.task in ("tagger", "ast") else "sst"
    kind = "tree" if args.mode == "train" and kind != "tagger" else kind
    try:
        wrapped = pkg.batched(PER_EXAMPLE[kind, args.mode], strategy=args.strategy)
    except TypeError as err:
        sys.exit(f"{pkg.__name__}.batched(fn, strategy=...): {err}")

    def step(batch):
        if args.mode == "infer":
            with torch.no_grad():
                return wrapped(batch, model)
        t0 = time.perf_counter()
        out = wrapped(batch, model)
        t1 = time.perf_counter()
        torch.stack(out).sum().backward()
        step.forward_s, step.backward_s = t1 - t0, time.perf_counter() - t1
        return out
    step.forward_s = step.backward_s = 0.0
    return step


def phases(pkg) -> dict:
    try:
        s = pkg.stats()
    except Exception:  # noqa: BLE001 - a version without stats() reports none
        return {}
    return {k: getattr(s, k) for k in ("nodes", "batches", *PHASES) if hasattr(s, k)}


def flat(out) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).double() for t in tree_leaves(out)
                      if isinstance(t, torch.Tensor)])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rev", required=True, help="where the old dynbatch/ comes from")
    for flag, choices in (("--task", T.TASKS), ("--impl", ("per-op", "blocks")),
                          ("--strategy", ("agenda", "depth")), ("--mode", ("train", "infer"))):
        ap.add_argument(flag, choices=choices, default=choices[0])
    for flag, default in (("--batch", 64), ("--minibatches", 4), ("--rounds", 8)):
        ap.add_argument(flag, type=int, default=default)
    ap.add_argument("--tiny", action="store_true", help="tasks.py's tiny dimensions")
    ap.add_argument("--sst-dir", default=None,
                    help="default: $DYNBATCH_SST_DIR, else ../shared/data/sst")
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args(argv)
    if args.impl == "blocks" and args.task not in ("sst128", "sst300"):
        sys.exit("--impl blocks has a form for sst128 and sst300 only")
    torch.set_num_threads(1)
    load_start = os.getloadavg()
    rev, head = git("rev-parse", "--short", args.rev), git("rev-parse", "--short", "HEAD")
    dirty = git("status", "--porcelain").splitlines()
    dirty_pkg = [line for line in dirty if line[3:].startswith("dynbatch/")]
    same = not dirty_pkg and not git("diff", "--name-only", args.rev, "HEAD", "--", "dynbatch")
    task = T.load_task_or_exit(args.task, limit=args.batch * args.minibatches,
                               sst_dir=T.sst_dir(args.sst_dir), tiny=args.tiny)
    model = T.make_model(task)
    batches = T.minibatches(task.examples, args.batch, args.minibatches)

    tmp = Path(tempfile.mkdtemp(prefix="dynbatch_ab_"))
    try:
        old = load_old(args.rev, tmp)
        versions = {"old": old, "new": db}
        steps = {k: version_step(pkg, args, model) for k, pkg in versions.items()}

        def run(k: str, batch) -> tuple:
            model.zero_grad(set_to_none=True)
            t0, c0 = time.perf_counter(), time.process_time()
            out = steps[k](batch)
            return out, time.perf_counter() - t0, time.process_time() - c0

        # sanity check: outputs, and in training the gradients, on the first minibatch
        a, b = (flat([run(k, batches[0])[0], *(p.grad for p in model.parameters())])
                for k in versions)
        agree = a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-4)
        diff = (a - b).abs().max().item() if a.shape == b.shape else float("nan")
        for k in versions:                   # warm-up: signature caches, first-call costs
            for batch in batches:
                run(k, batch)
        counts = {k: {n: v for n, v in phases(pkg).items() if n in ("nodes", "batches")}
                  for k, pkg in versions.items()}
        times = {k: [] for k in versions}    # (wall, cpu, {phase: s})
        ratios = []
        for r in range(args.rounds):
            for i, batch in enumerate(batches):
                pair = {}
                for k in (("old", "new") if (r + i) % 2 == 0 else ("new", "old")):
                    _, wall, cpu = run(k, batch)
                    pair[k] = wall
                    times[k].append((wall, cpu, {**phases(versions[k]),
                                                 "forward_s": steps[k].forward_s,
                                                 "backward_s": steps[k].backward_s}))
                ratios.append(pair["new"] / pair["old"])
    finally:                # the old copy goes: a later main() in this process loads anew
        for name in [m for m in sys.modules if m == OLD or m.startswith(OLD + ".")]:
            del sys.modules[name]
        if str(tmp) in sys.path:
            sys.path.remove(str(tmp))
        shutil.rmtree(tmp, ignore_errors=True)
    load_end = os.getloadavg()

    ms, out = 1e3, {}
    loads = " ".join(f"{x:.2f}" for x in load_start), " ".join(f"{x:.2f}" for x in load_end)
    print(f"{args.task} {args.impl} {args.strategy} {args.mode}, B={args.batch}, "
          f"{args.minibatches} minibatches x {args.rounds} rounds, 1 thread; load "
          f"{loads[0]} at start, {loads[1]} at end")
    state = f", dirty ({len(dirty)} paths, {len(dirty_pkg)} under dynbatch/)" if dirty else ""
    print(f"  old = {args.rev} ({rev}); new = working tree at HEAD {head}{state}"
          + ("; dynbatch/ identical in both" if same else ""))
    what = "losses and gradients" if args.mode == "train" else "outputs"
    print(f"  minibatch 0: the versions' {what} agree (max abs diff {diff:.2g})" if agree else
          f"  WARNING: on minibatch 0 the versions' {what} differ (max abs diff {diff:.3g}): "
          f"the A/B compares different computations")
    for k in versions:
        wall, cpu, split = zip(*times[k])
        o = out[k] = {"step_ms_median": statistics.median(wall) * ms,
                      "step_ms_min": min(wall) * ms, "cpu_ms_median": statistics.median(cpu) * ms,
                      **{f"{p[:-2]}_ms_median": statistics.median(t[p] for t in split) * ms
                         for p in PHASES if all(p in t for t in split)}, **counts[k]}
        print(f"  {k}: step median {o['step_ms_median']:.1f} ms, min {o['step_ms_min']:.1f}, "
              f"CPU median {o['cpu_ms_median']:.1f}; forward median " +
              ", ".join(f"{p[:-2]} {o[p[:-2] + '_ms_median']:.1f}" for p in PHASES
                        if p[:-2] + "_ms_median" in o) +
              (f"; {o['nodes']} nodes / {o['batches']} batches"
               if "batches" in o and "nodes" in o else ""))
    q1, q3 = statistics.quantiles(ratios, n=4)[::2] if len(ratios) > 1 else ratios * 2
    med = statistics.median(ratios)
    print(f"  new/old step time: median {med:.3f} (IQR {q1:.3f}-{q3:.3f}, range "
          f"{min(ratios):.3f}-{max(ratios):.3f}) over {len(ratios)} pairs")
    if args.json:
        out.update(args=vars(args), rev=rev, head=head, dirty=len(dirty), same_package=same,
                   load_start=load_start, load_end=load_end, agree=agree, max_abs_diff=diff,
                   ratio={"median": med, "q1": q1, "q3": q3, "min": min(ratios),
                          "max": max(ratios), "pairs": len(ratios), "all": ratios})
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
