#!/usr/bin/env python
"""dynbatch benchmark: unbatched eager, hand-batched, dynbatch (agenda / depth, per-op and
blocks), DyNet autobatch and TorchFold, side by side, interleaved, on the same data and weights.

    python scripts/bench.py                      # everything (~20-40 min on 2 shared cores)
    python scripts/bench.py --quick              # sst128 at B=64: ~1 min (3 under load)
    python scripts/bench.py --tasks sst128 --impls hand,dynbatch-blocks --sizes 64 --threads 1

Outputs: BENCHMARKS.md (repo root), benchmarks/results/bench.json and
benchmarks/results/speedup.png for a full default run; any subset (--quick, --tasks, --impls,
--sizes, --threads, --tiny) writes to runs/bench/ instead, so a one-cell run never replaces
the committed report; --out DIR puts all three in DIR. Exits 1 if an implementation
disagrees with the eager per-example code or fails. The method is documented in benchmarks/harness.py.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _list(kind, allowed=None, aliases=None):
    def parse(text: str):
        out = []
        for item in text.split(","):
            item = item.strip()
            if not item:
                continue
            items = (aliases or {}).get(item, (item,))
            for x in items:
                x = kind(x)
                if allowed is not None and x not in allowed:
                    raise argparse.ArgumentTypeError(
                        f"{x!r} is not one of {', '.join(map(str, allowed))}"
                        + (f" (or {', '.join(aliases)})" if aliases else ""))
                if x not in out:
                    out.append(x)
        if not out:
            raise argparse.ArgumentTypeError("empty list")
        return tuple(out)
    return parse


def parse_args(argv):
    from benchmarks import harness as H
    from benchmarks.tasks import TASKS
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="implementations: " + ", ".join(H.IMPLS)
                                 + "; groups: " + ", ".join(f"{k} = {'+'.join(v)}"
                                                            for k, v in H.ALIASES.items()))
    ap.add_argument("--tasks", type=_list(str, TASKS), help=f"default: {','.join(TASKS)}")
    ap.add_argument("--impls", type=_list(str, H.IMPLS, H.ALIASES), help="default: all")
    ap.add_argument("--sizes", type=_list(int), help="minibatch sizes (default 1,16,64,256)")
    ap.add_argument("--threads", type=_list(int), help="torch thread counts (default 1,2)")
    ap.add_argument("--repeats", type=int, help="interleaved rounds per cell (default 3)")
    ap.add_argument("--target-repeats", type=int,
                    help="rounds of the cell the issue's targets are judged on, sst128 B=64 "
                         "1 thread, each of 256 examples (default 9; --quick and --tiny: "
                         "as any other cell)")
    ap.add_argument("--limit", type=int, help="examples loaded per task (default 1024)")
    ap.add_argument("--examples", type=int, default=64,
                    help="examples timed per round (default 64; at least one minibatch, "
                         "at most 8 minibatches)")
    ap.add_argument("--eager-examples", type=int, default=8,
                    help="unbatched eager's cap on examples per round (default 8)")
    ap.add_argument("--memory-sizes", type=_list(int),
                    help="sizes for the peak-memory processes (default 64,256; only those "
                         "also in --sizes)")
    ap.add_argument("--memory-impls", type=_list(str, H.IMPLS, H.ALIASES),
                    help="implementations measured for memory (default: all that run)")
    ap.add_argument("--memory-tasks", type=_list(str, TASKS),
                    help="tasks measured for memory (default: all that run)")
    ap.add_argument("--memory-steps", type=int,
                    help="training steps per memory size, on distinct minibatches (default "
                         f"{H.MEMORY_STEPS}; --quick 3, --tiny 2): the peak after the first "
                         "and after the last")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    ap.add_argument("--quick", action="store_true",
                    help="sst128 only, B=64, 1 thread, 3 rounds, first 256 trees, memory for "
                         "hand, dynbatch-agenda, dynbatch-blocks-agenda (~1 min idle, "
                         "~3 min on a loaded machine)")
    ap.add_argument("--tiny", action="store_true",
                    help="tiny model dims and few examples (for tests: checks the harness, "
                         "not speed)")
    ap.add_argument("--sst-dir", default=None,
                    help="SST directory (default: $DYNBATCH_SST_DIR, else ../shared/data/sst "
                         "from the repository root)")
    ap.add_argument("--out", default=None, help="directory for BENCHMARKS.md, bench.json and "
                                                "speedup.png")
    ap.add_argument("--report-only", metavar="JSON", default=None,
                    help="rewrite BENCHMARKS.md and the plot from an earlier bench.json "
                         "(to --out, or next to the JSON) without running anything")
    ap.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def config(args, argv):
    from benchmarks import harness as H
    from benchmarks import tasks as T
    cfg = H.Config()
    if args.quick:
        cfg.tasks, cfg.sizes, cfg.threads, cfg.memory_sizes = ("sst128",), (64,), (1,), (64,)
        cfg.limit, cfg.quick = 256, True
        cfg.memory_impls = ("hand", "dynbatch-agenda", "dynbatch-blocks-agenda")
        cfg.memory_steps = 3
    if args.tiny:
        cfg.tiny, cfg.limit, cfg.memory_steps = True, 24, 2
    for name in ("tasks", "impls", "sizes", "threads", "repeats", "limit", "memory_sizes",
                 "memory_impls", "memory_tasks", "memory_steps"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    if args.quick or args.tiny:     # the quick run is the target cell: keep it quick
        cfg.target_repeats, cfg.target_examples = cfg.repeats, 0
    if args.target_repeats is not None:
        cfg.target_repeats = args.target_repeats
    if args.no_memory:
        cfg.memory_sizes = ()
    if cfg.memory_steps < 1:
        sys.exit("--memory-steps must be at least 1")
    cfg.examples, cfg.eager_examples = args.examples, args.eager_examples
    cfg.sst_dir = str(T.sst_dir(args.sst_dir))
    cfg.command = "python scripts/bench.py" + ("" if not argv else " " + shlex.join(argv))
    partial = (args.quick or args.tiny or any(getattr(args, n) is not None for n in
                                              ("tasks", "impls", "sizes", "threads", "limit")))
    if args.out:
        out = Path(args.out)
        md, js, png = out / "BENCHMARKS.md", out / "bench.json", out / "speedup.png"
    elif partial:
        out = ROOT / "runs" / "bench"
        md, js, png = out / "BENCHMARKS.md", out / "bench.json", out / "speedup.png"
    else:
        md = ROOT / "BENCHMARKS.md"
        js, png = ROOT / "benchmarks" / "results" / "bench.json", \
            ROOT / "benchmarks" / "results" / "speedup.png"
    cfg.out_md, cfg.out_json, cfg.out_png = str(md), str(js), str(png)
    return cfg


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    from benchmarks import harness as H
    if args.memory_worker:
        H.memory_worker(args.memory_worker)
        return 0
    from benchmarks import report
    if args.report_only:
        import json
        src = Path(args.report_only)
        result = json.loads(src.read_text())
        out = Path(args.out) if args.out else src.parent
        md = out / "BENCHMARKS.md" if args.out else (
            ROOT / "BENCHMARKS.md" if src.resolve() == (ROOT / "benchmarks" / "results" /
                                                         "bench.json").resolve()
            else out / "BENCHMARKS.md")
        png = out / "speedup.png"
        why = report.write_plot(result, png)
        if why:
            H.log(f"plot skipped: {why}")
        report.write_markdown(result, md, None if why else png)
        H.log(f"wrote {md}" + ("" if why else f", {png}"))
        return 0
    cfg = config(args, argv)
    result = H.run(cfg)
    js, md, png = Path(cfg.out_json), Path(cfg.out_md), Path(cfg.out_png)
    report.write_json(result, js)
    why = report.write_plot(result, png)
    if why:
        H.log(f"plot skipped: {why}")
    report.write_markdown(result, md, None if why else png)
    H.log(f"wrote {md}, {js}" + ("" if why else f", {png}"))
    for line in report.headline(result, cfg.tasks[0] if result["tasks"] else "sst128",
                                64 if 64 in cfg.sizes else max(cfg.sizes), cfg.threads[0]):
        print(line)
    status = 0
    if not result["agreement_ok"]:
        H.log("AGREEMENT FAILED: an implementation disagrees with eager (see the report)")
        status = 1
    if result["errors"]:
        H.log("FAILED while timing: " + "; ".join(f"{k}: {v}" for k, v in result["errors"].items()))
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
