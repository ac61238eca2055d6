"""Microseconds to record one op, by the path it takes into the tracer.

    python benchmarks/trace_cost.py
    python benchmarks/trace_cost.py --n 5000 --only linear,block

Each op is recorded N times on one line of code inside one ``db.autobatch()`` scope, and
the recorded results are dropped before the scope ends; the figure is the recording
alone, nothing is executed for it (a run executes only what a result or a read needs:
NOTE [dead code] in dynbatch/schedule.py). CPU time of this process (less sensitive to
other load than wall time), the median of ``--repeats`` scopes.

Two columns:
- same call: the line makes the same call every time (the same function and shared
  objects, per-example inputs of the same shapes), as model code mostly does; the
  tracer then records it the fast way it keeps per line of code (NOTE [call sites] in
  dynbatch/trace.py).
- alternating: the line alternates between two calls (other input shapes, or another
  shared weight or module), so each call differs from the last one made there; the
  tracer records them the general way (the call's signature key and a dictionary lookup).
Only the public API is used (``db.autobatch``, ``db.block``'s models), so the engine may
be laid out in any way.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dynbatch as db  # noqa: E402
from benchmarks import tasks as T  # noqa: E402


def _inputs() -> SimpleNamespace:
    """Per-example lazy tensors of the current scope: x, y of 128 values, z, w of 64."""
    x = torch.tanh(torch.ones(128) * 0.5)
    z = torch.tanh(torch.ones(64) * 0.5)
    return SimpleNamespace(x=x, y=x * 2, z=z, w=z * 2)


torch.manual_seed(0)
W, W2 = torch.randn(128, 128), torch.randn(128, 128)
lin, lin2 = torch.nn.Linear(128, 128), torch.nn.Linear(128, 128)
# leaf, node and node_loss are blocks
tree_lstm, tree_lstm2 = (T.BlocksBinaryTreeLSTM(10, 128, 128, 5) for _ in range(2))

# name -> (the loop recording one op per item of seq, the two argument tuples it
# alternates between: (A, B); None where there is no second way)
CASES = {
    "x * y  (operator)":
        (lambda seq: [a * b for a, b in seq], lambda v: ((v.x, v.y), (v.z, v.w))),
    "x.sigmoid()  (Tensor method)":
        (lambda seq: [a.sigmoid() for a, in seq], lambda v: ((v.x,), (v.z,))),
    "torch.sigmoid(x)  (hot torch function)":
        (lambda seq: [torch.sigmoid(a) for a, in seq], lambda v: ((v.x,), (v.z,))),
    "torch.erf(x)  (torch function via the mode)":
        (lambda seq: [torch.erf(a) for a, in seq], lambda v: ((v.x,), (v.z,))),
    "torch.cat([x, y])":
        (lambda seq: [torch.cat([a, b]) for a, b in seq], lambda v: ((v.x, v.y), (v.z, v.w))),
    "x.chunk(4)  (4 outputs)":
        (lambda seq: [a.chunk(4) for a, in seq], lambda v: ((v.x,), (v.z,))),
    "F.linear(x, W)  (shared weight)":
        (lambda seq: [F.linear(a, m) for a, m in seq], lambda v: ((v.x, W), (v.x, W2))),
    "lin(x)  (nn.Linear block)":
        (lambda seq: [m(a) for m, a in seq], lambda v: ((lin, v.x), (lin2, v.x))),
    "model.node((x,y), (y,x))  (@db.block method)":
        (lambda seq: [m.node((a, b), (b, a)) for m, a, b in seq],
         lambda v: ((tree_lstm, v.x, v.y), (tree_lstm2, v.x, v.y))),
    "torch.tensor(i)  (per-example constant)":
        (lambda seq: [torch.tensor(i) for i in seq], None),
    "(the loop alone, recording nothing)":
        (lambda seq: [a for a, b in seq], lambda v: ((v.x, v.y), (v.z, v.w))),
}


def measure(body, args, alternate: bool, n: int, repeats: int) -> float:
    """Median over ``repeats`` scopes of ``n`` recordings, in us per op."""
    times = []
    for _ in range(repeats):
        with db.autobatch():
            v = _inputs()
            if args is None:
                seq = range(n)              # a fresh value each time: a new constant
            else:
                a, b = args(v)
                seq = [a, b] * (n // 2) if alternate else [a] * n
            gc.disable()
            t0 = time.process_time()
            out = body(seq)
            times.append((time.process_time() - t0) / len(seq) * 1e6)
            gc.enable()
            del out, seq, v                 # nothing holds what was recorded
    return statistics.median(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20000, help="ops recorded in one scope")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", default="",
                    help="comma-separated parts of case names: measure only those")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    wanted = [w for w in args.only.split(",") if w]
    print(f"{'op':46s} us/op: same call / alternating (median of {args.repeats} x {args.n})")
    for name, (body, pair) in CASES.items():
        if wanted and not any(w in name for w in wanted):
            continue
        measure(body, pair, False, 100, 1)          # first calls: signatures, blocks
        same = measure(body, pair, False, args.n, args.repeats)
        alt = measure(body, pair, True, args.n, args.repeats) if pair is not None else None
        print(f"{name:46s} {same:6.2f} / " + (f"{alt:6.2f}" if alt is not None else "     -"))


if __name__ == "__main__":
    main()
