"""Microseconds to record one op, by the path it takes into the tracer.

    python benchmarks/trace_cost.py

Each op is recorded N times inside one autobatch scope whose pending work is then dropped
(nothing is executed), so the figure is tracing alone: signature key, cache lookup, node,
lazy result. CPU time of this process (less sensitive to other load than wall time).
"""
from __future__ import annotations

import gc
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dynbatch as db  # noqa: E402
from benchmarks import tasks as T  # noqa: E402
from dynbatch import trace  # noqa: E402

N = 20000


def measure(body) -> float:
    """Median over 5 repetitions of N recordings, in us per op."""
    times = []
    for _ in range(5):
        with db.autobatch():
            x = torch.tanh(torch.ones(128) * 0.5)
            y = x * 2
            gc.disable()
            t0 = time.process_time()
            body(x, y)
            times.append((time.process_time() - t0) / N * 1e6)
            gc.enable()
            run = trace.current_run()
            run.graph.nodes[2:] = []        # drop what was recorded: time tracing only
    return statistics.median(times)


W = torch.randn(128, 128)
lin = torch.nn.Linear(128, 128)
tree_lstm = T.BlocksBinaryTreeLSTM(10, 128, 128, 5)     # leaf, node and node_loss are blocks
CASES = {
    "x * y  (operator)": lambda x, y: [x * y for _ in range(N)],
    "x.sigmoid()  (Tensor method)": lambda x, y: [x.sigmoid() for _ in range(N)],
    "torch.sigmoid(x)  (hot torch function)": lambda x, y: [torch.sigmoid(x) for _ in range(N)],
    "torch.erf(x)  (torch function via the mode)": lambda x, y: [torch.erf(x) for _ in range(N)],
    "torch.cat([x, y])": lambda x, y: [torch.cat([x, y]) for _ in range(N)],
    "x.chunk(4)  (4 outputs)": lambda x, y: [x.chunk(4) for _ in range(N)],
    "F.linear(x, W)  (shared weight)": lambda x, y: [F.linear(x, W) for _ in range(N)],
    "lin(x)  (nn.Linear block)": lambda x, y: [lin(x) for _ in range(N)],
    "model.node((x,y), (y,x))  (@db.block method)":
        lambda x, y: [tree_lstm.node((x, y), (y, x)) for _ in range(N)],
    "torch.tensor(i)  (per-example constant)": lambda x, y: [torch.tensor(i) for i in range(N)],
}


def main() -> None:
    torch.set_num_threads(1)
    print(f"{'op':45s} us/op (median of 5 x {N})")
    for name, body in CASES.items():
        print(f"{name:45s} {measure(body):6.2f}")


if __name__ == "__main__":
    main()
