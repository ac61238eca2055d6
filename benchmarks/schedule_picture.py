#!/usr/bin/env python
"""The pictures of the README: the schedule of one SST Tree-LSTM training minibatch,
written per-op and with blocks, from ``db.stats().plot`` (and each run's table printed).

    python benchmarks/schedule_picture.py                  # B=32, into docs/
    python benchmarks/schedule_picture.py --batch 64 --out /tmp
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import dynbatch as db  # noqa: E402
from benchmarks import tasks as T  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--out", default=str(ROOT / "docs"))
    ap.add_argument("--sst-dir", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    task = T.load_task_or_exit("sst128", limit=args.batch, sst_dir=T.sst_dir(args.sst_dir))
    trees = task.examples[:args.batch]
    loss = T._DB_FNS["tree_loss", "agenda"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for form, prepare in (("perop", lambda m: m), ("blocks", T._to_blocks)):
        model = prepare(T.make_model(task))
        for _ in range(2):          # the second run's times: signatures made already
            torch.stack(loss(trees, model)).sum().backward()
        stats = db.stats()
        print(f"## {form}\n{stats.table()}\n")
        path = out / f"schedule_{form}.png"
        stats.plot(path, f"SST Tree-LSTM, {args.batch} trees, "
                         f"{'per-op code' if form == 'perop' else 'blocks'}: "
                         f"{stats.nodes} nodes in {stats.batches} batches")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
