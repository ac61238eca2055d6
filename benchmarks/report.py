"""Outputs of a benchmark run: bench.json, the markdown report and the speedup plot."""
from __future__ import annotations

import json
import math
from pathlib import Path

from benchmarks import harness as H


def write_json(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")


def _fmt(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def _ratio(x: float | None) -> str:
    return "—" if x is None else (f"{x:.0f}×" if x >= 100 else f"{x:.2f}×" if x < 10
                                  else f"{x:.1f}×")


def _rows(result: dict, **match) -> list[dict]:
    return [r for r in result["results"] if all(r.get(k) == v for k, v in match.items())]


def _impls(result: dict, task: str) -> list[str]:
    seen = {r["impl"] for r in result["results"] if r["task"] == task}
    return [n for n in H.IMPLS if n in seen]


def _cell(r: dict | None, mode: str) -> str:
    if r is None:
        return "—"
    parts = [f"**{_fmt(r[f'{mode}_eps'])}**" + ("†" if r.get("eager_capped") else "")]
    ratios = [_ratio(r.get(f"{mode}_x_{ref}")) for ref in ("eager", "hand")
              if f"{mode}_x_{ref}" in r]
    if ratios:
        parts.append("(" + " / ".join(ratios) + ")")
    return " ".join(parts)


def _mem(result: dict, task: str, impl: str, B: int) -> dict | None:
    return next((m for m in result["memory"]
                 if m["task"] == task and m["impl"] == impl and m["batch"] == B), None)


def headline(result: dict, task: str = "sst128", B: int = 64, threads: int = 1) -> list[str]:
    rows = _rows(result, task=task, batch=B, threads=threads)
    if not rows:
        return []
    mem_sizes = sorted({m["batch"] for m in result["memory"] if m["task"] == task})
    out = [f"### Headline: {task}, minibatch {B}, {threads} thread{'s' * (threads > 1)}", "",
           "| " + " | ".join(["implementation", "train ex/s", "× hand", "× eager", "infer ex/s",
                              "× hand", "× eager", "batched calls (train)"]
                             + [f"peak RSS Δ B={s} (× hand)" for s in mem_sizes]) + " |",
           "|---|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(mem_sizes)]
    for r in sorted(rows, key=lambda r: H.IMPLS.index(r["impl"])):
        calls = r.get("train_stats", {}).get("batches")
        mems = []
        for s in mem_sizes:
            m, h = _mem(result, task, r["impl"], s), _mem(result, task, "hand", s)
            mems.append("—" if m is None else f"{m['delta_mb']:.0f} MB"
                        + (f" ({m['delta_mb'] / h['delta_mb']:.2f}×)"
                           if h and h["delta_mb"] > 0 else "")
                        + ("‡" if r["impl"] == "dynet" else ""))
        out.append(f"| {H.LABELS[r['impl']]} | {_fmt(r['train_eps'])}"
                   f"{'†' if r.get('eager_capped') else ''} | {_ratio(r.get('train_x_hand'))} | "
                   f"{_ratio(r.get('train_x_eager'))} | {_fmt(r['infer_eps'])} | "
                   f"{_ratio(r.get('infer_x_hand'))} | {_ratio(r.get('infer_x_eager'))} | "
                   f"{'—' if calls is None else f'{calls:.0f}'} |"
                   + "".join(f" {m} |" for m in mems))
    notes = [""]
    if any(r.get("eager_capped") for r in rows):
        notes += ["† timed on fewer examples, reported per example (see Run).", ""]
    dy, hd = _mem(result, task, "dynet", max(mem_sizes or [0])), \
        _mem(result, task, "hand", max(mem_sizes or [0]))
    if dy and hd:
        notes.append(f"‡ Δ is over each process's base after one single-example step; DyNet's "
                     f"base holds the memory pool it must preallocate to autobatch "
                     f"({dy['base_mb'] - hd['base_mb']:.0f} MB more than hand-batched's base): "
                     f"whole-process peak at B={dy['batch']} is {dy['peak_mb']:.0f} MB vs "
                     f"{hd['peak_mb']:.0f} MB ({dy['peak_mb'] / hd['peak_mb']:.2f}×). "
                     f"See Peak memory.")
        notes.append("")
    return out + notes


# Issue 4's targets, on sst128, B=64, 1 thread: (label, implementations, mode, at least).
TARGETS = (
    ("blocks form, training ≥ 0.7× hand-batched", ("dynbatch-blocks-agenda",
                                                   "dynbatch-blocks-depth"), "train", 0.7),
    ("per-op form, training ≥ 0.3× hand-batched", ("dynbatch-agenda", "dynbatch-depth"),
     "train", 0.3),
    ("blocks form, inference ≥ 0.5× hand-batched", ("dynbatch-blocks-agenda",
                                                    "dynbatch-blocks-depth"), "infer", 0.5),
)
MEMORY_TARGET = 1.5


def _spread(runs: list | None, goal: float) -> str:
    """'; rounds 0.55-0.68, 3 of 9 >= 0.7' from the per-round ratios (absent in results
    written before they were kept)."""
    if not runs or len(runs) < 2:
        return ""
    reached = sum(r >= goal for r in runs)
    return (f"; rounds {min(runs):.2f}–{max(runs):.2f}, {reached} of {len(runs)} "
            f"≥ {goal}")


def targets(result: dict, task: str = "sst128", B: int = 64, threads: int = 1) -> list[str]:
    """The issue's targets against this run: one line each, measured value and verdict."""
    rows = {r["impl"]: r for r in _rows(result, task=task, batch=B, threads=threads)}
    if "hand" not in rows:
        return []
    hand = rows["hand"]
    spread = (", then the range over the rounds and how many of them reach the target"
              if hand.get("train_x_hand_runs") else "")
    out = [f"Targets of issue 4 ({task}, B={B}, {threads} thread; ratio to hand-batched "
           f"measured in this run: the median of {hand['rounds']} interleaved rounds"
           f"{spread}):", ""]
    for label, impls, mode, goal in TARGETS:
        vals = [f"{H.LABELS[i]} {rows[i][f'{mode}_x_hand']:.2f}× "
                f"({'met' if rows[i][f'{mode}_x_hand'] >= goal else 'not met'}"
                + _spread(rows[i].get(f"{mode}_x_hand_runs"), goal) + ")"
                for i in impls if i in rows]
        if vals:
            out.append(f"- {label}: " + "; ".join(vals))
    if "dynet" in rows:
        out.append(f"- DyNet autobatch for reference: training {rows['dynet']['train_x_hand']:.2f}×,"
                   f" inference {rows['dynet']['infer_x_hand']:.2f}× hand-batched")
    mem = [m for m in result["memory"] if m["task"] == task and m["impl"].startswith("dynbatch")]
    for m in sorted(mem, key=lambda m: (m["batch"], H.IMPLS.index(m["impl"]))):
        h = _mem(result, task, "hand", m["batch"])
        if h and h["delta_mb"] > 0:
            ratios = [m["delta_mb"] / h["delta_mb"]]
            said = f"{ratios[0]:.2f}× after one step"
            steady = _steady_ratio(m, h)
            if steady is not None:
                ratios.append(steady)
                said += f", {steady:.2f}× over {m['steps']} steps"
            met = max(ratios) <= MEMORY_TARGET
            out.append(f"- peak memory Δ ≤ {MEMORY_TARGET}× hand-batched, {H.LABELS[m['impl']]}, "
                       f"B={m['batch']}: {said} ({'met' if met else 'not met'}; "
                       f"whole-process peak {m['peak_mb'] / h['peak_mb']:.2f}×)")
    return out + [""]


def _steady_ratio(m: dict, h: dict) -> float | None:
    """Δ over several steps, × hand-batched's over as many; None when either ran one."""
    if m.get("steps", 1) < 2 or h.get("steps", 1) != m["steps"] or h["steady_delta_mb"] <= 0:
        return None
    return m["steady_delta_mb"] / h["steady_delta_mb"]


def markdown(result: dict, png_name: str | None) -> str:
    meta, cfg, mach = result["meta"], result["meta"]["config"], result["meta"]["machine"]
    sizes, threads = cfg["sizes"], cfg["threads"]
    L = ["# Benchmarks", "",
         "Generated by `scripts/bench.py` (do not edit by hand; rerun it). Throughput in "
         "examples per second (trees or sentences); **training** = forward, backward and "
         "one Adam step per minibatch; **inference** = forward under `no_grad` (root logits "
         "for trees, every token's logits for the tagger). In parentheses: ratio to unbatched "
         "eager / ratio to hand-batched, each the median of per-round ratios measured "
         "interleaved in the same process (ratios are the figures to quote: absolute numbers "
         "on this shared machine move with its load).", "",
         "## Run", "",
         f"- command: `{meta['command']}`",
         f"- started {meta['started']}, took {meta.get('seconds', 0) / 60:.1f} min",
         f"- machine: {mach['cpu']}, {mach['cores']} cores, "
         + (f"{mach['memory_gib']:.0f} GiB" if mach.get("memory_gib") else "") + f"; "
         f"{mach['platform']}",
         f"- load average (1 min) at start {meta['load_start'][0]:.2f}, at end "
         f"{meta.get('load_end', [float('nan')])[0]:.2f}; per cell "
         + _load_range(result) + " (the machine is shared: 2 cores, other work running)",
         f"- versions: Python {mach['python']}, torch {mach['torch']}, numpy {mach['numpy']}, "
         f"dynbatch {mach['dynbatch']} (git {mach['git']}), dynet38 {mach['dynet'] or '—'}, "
         f"torchfold {mach['torchfold'] or '—'}",
         f"- torch threads: {', '.join(map(str, threads))} (`torch.set_num_threads`; interop "
         f"{meta['interop_threads']}); DyNet from PyPI is single-threaded at every setting",
         f"- minibatch sizes {', '.join(map(str, sizes))}; {cfg['repeats']} interleaved rounds "
         f"per cell" + _target_rounds(result) + "; examples per round: "
         + ", ".join(f"B={b}: {n}" for b, n in meta["examples_per_round"].items())
         + f"; data: the first {cfg['limit']} examples per task, round r timing the r-th chunk",
         f"- † unbatched eager is timed on the first {cfg['eager_examples']} examples of each "
         f"round (one minibatch of that size; its per-example cost does not depend on the "
         f"minibatch size), reported per example",
         "- same initial weights for every implementation (a copy of one seeded model; DyNet "
         "copies its values), Adam lr 1e-3 (DyNet: clipping off, dense updates), "
         "float32, CPU", ""]
    if result["skipped"]:
        L += ["Skipped:", ""] + [f"- {k}: {v}" for k, v in result["skipped"].items()] + [""]

    if result.get("errors"):
        L += ["Failed while timing (left out from there on):", ""] + \
            [f"- {k}: {v}" for k, v in result["errors"].items()] + [""]
    L += ["## Tasks and agreement", "",
          "Before timing, every implementation runs the task's first minibatch from the same "
          "weights; per-example losses, inference outputs and every parameter gradient are "
          "compared with the eager per-example code (float32; tolerances: losses "
          f"{H.TOL_LOSS:g} relative, outputs {H.TOL_OUT:g}, gradients {H.TOL_GRAD:g} of the "
          "largest entry).", ""]
    for name, t in result["tasks"].items():
        L += [f"**{name}**: {t['info']}. Data: {t['source']}; vocabulary {t['vocab']}; "
              + ", ".join(f"{k} {v}" for k, v in t["extra"].items()) + ".", "",
              f"| implementation (first {t['agreement_batch']} examples) | loss max abs diff | "
              "loss max rel | outputs max abs | grads max rel | agrees |",
              "|---|---:|---:|---:|---:|:---:|"]
        for impl, a in t["agreement"].items():
            if "error" in a:
                L.append(f"| {H.LABELS[impl]} | error: {a['error']} | | | | **no** |")
            else:
                L.append(f"| {H.LABELS[impl]} | {a['loss_max_abs']:.1e} | "
                         f"{a['loss_max_rel']:.1e} | {a['output_max_abs']:.1e} | "
                         f"{a['grad_max_rel']:.1e} | {'yes' if a['ok'] else '**NO**'} |")
        L.append("")

    L += ["## Headline", ""]
    if "sst128" in result["tasks"] and 64 in sizes:
        L += targets(result, "sst128", 64, threads[0])
    for task in ("sst128",) + tuple(t for t in result["tasks"] if t != "sst128"):
        if task in result["tasks"]:
            B = 64 if 64 in sizes else max(sizes)
            L += headline(result, task, B, threads[0])
    if png_name:
        L += [f"![speedup over unbatched eager]({png_name})", ""]

    L += ["## Throughput", ""]
    for task in result["tasks"]:
        impls = _impls(result, task)
        for th in threads:
            for mode, title in (("train", "training"), ("infer", "inference")):
                L += [f"### {task}: {title}, {th} thread{'s' * (th > 1)}", "",
                      "| implementation | " + " | ".join(f"B={b}" for b in sizes) + " |",
                      "|---|" + "---:|" * len(sizes)]
                for impl in impls:
                    cells = []
                    for b in sizes:
                        rr = _rows(result, task=task, impl=impl, threads=th, batch=b)
                        cells.append(_cell(rr[0] if rr else None, mode))
                    L.append(f"| {H.LABELS[impl]} | " + " | ".join(cells) + " |")
                L.append("")

    L += ["## Batched calls per minibatch", "",
          "dynbatch: `db.stats().batches` of the minibatch's run (forward only; the backward "
          "pass mirrors it); TorchFold: its (depth, op) groups. Median over rounds.", ""]
    for task in result["tasks"]:
        impls = [i for i in _impls(result, task) if i.startswith("dynbatch") or i == "torchfold"]
        if not impls:
            continue
        L += [f"### {task}", "", "| implementation | "
              + " | ".join(f"train B={b} | infer B={b}" for b in sizes) + " |",
              "|---|" + "---:|---:|" * len(sizes)]
        for impl in impls:
            cells = []
            for b in sizes:
                rr = _rows(result, task=task, impl=impl, threads=threads[0], batch=b)
                for mode in ("train", "infer"):
                    s = rr[0].get(f"{mode}_stats") if rr else None
                    cells.append("—" if not s else f"{s['batches']:.0f}")
            L.append(f"| {H.LABELS[impl]} | " + " | ".join(cells) + " |")
        L.append("")

    L += ["## dynbatch time split", "",
          "Milliseconds per minibatch from `db.stats()` (trace / schedule / execute of the "
          "forward run), and the rest of the training step (backward, Adam, stacking the "
          f"results) = step time − the three; {threads[0]} thread"
          f"{'s' * (threads[0] > 1)}. Medians over rounds.", ""]
    for task in result["tasks"]:
        impls = [i for i in _impls(result, task) if i.startswith("dynbatch")]
        if not impls:
            continue
        L += [f"### {task}", "",
              "| implementation | B | nodes | train: trace | schedule | execute | rest | step | "
              "infer: trace | schedule | execute | total |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for impl in impls:
            for b in sizes:
                rr = _rows(result, task=task, impl=impl, threads=threads[0], batch=b)
                if not rr or "train_stats" not in rr[0]:
                    continue
                r, s, si = rr[0], rr[0]["train_stats"], rr[0].get("infer_stats", {})
                step = 1e3 * b / r["train_eps"]
                total_i = 1e3 * b / r["infer_eps"]
                parts = [1e3 * s[k] for k in ("trace_s", "schedule_s", "execute_s")]
                ip = [1e3 * si.get(k, float("nan")) for k in ("trace_s", "schedule_s",
                                                               "execute_s")]
                L.append(f"| {H.LABELS[impl]} | {b} | {s['nodes']:.0f} | "
                         + " | ".join(f"{p:.1f}" for p in parts)
                         + f" | {step - sum(parts):.1f} | {step:.1f} | "
                         + " | ".join(f"{p:.1f}" for p in ip) + f" | {total_i:.1f} |")
        L.append("")

    if result["memory"]:
        L += ["## Peak memory", "",
              "Resident set high-water mark (VmHWM in /proc/self/status) of a fresh process per "
              "implementation that loads the same data and weights, builds the implementation, "
              "runs one training step on ONE example (this pages in the library code and "
              "allocates the parameters, Adam's state and, for DyNet, the memory pool that it "
              "must preallocate when autobatching: together the *base*; the high-water mark is "
              "then lowered to it through /proc/self/clear_refs, so that a transient peak of "
              "the set-up cannot hide the steps), then training steps on distinct minibatches "
              "at each size, ascending (so the B=256 figures include B=64's steps). "
              "**Δ = peak − base**: what the minibatch itself costs, after the first step at "
              "that size and after the last (*over N steps*: what training keeps needing "
              "once the allocators hold what earlier steps left them; eager runs one step). "
              "*peak × hand* compares "
              "whole processes (PyTorch alone is ~300 MB of it). One thread, and glibc's mmap "
              "threshold fixed at 128 KiB (`MALLOC_MMAP_THRESHOLD_`), so that freed tensors "
              "leave the resident set and the figures repeat (left dynamic, hand-batched's "
              "AST Δ at B=64 ranged 19-45 MB over three identical processes). Eager is "
              f"measured up to B={H.EAGER_MEMORY_MAX} only (a minute or more per step beyond).",
              ""]
        for task in result["tasks"]:
            ms = sorted({m["batch"] for m in result["memory"] if m["task"] == task})
            impls = [i for i in _impls(result, task)
                     if any(_mem(result, task, i, b) for b in ms)]
            if not impls:
                continue
            steps = max(m.get("steps", 1) for m in result["memory"] if m["task"] == task)
            more = f" | Δ over {steps} steps | × hand" if steps > 1 else ""
            L += [f"### {task}", "", "| implementation | base | "
                  + " | ".join(f"peak B={b} | peak × hand | Δ B={b} | Δ × hand{more}"
                               for b in ms)
                  + " |", "|---|---:|" + ("---:|" * (6 if more else 4)) * len(ms)]
            for impl in impls:
                cells = []
                base = None
                for b in ms:
                    m, h = _mem(result, task, impl, b), _mem(result, task, "hand", b)
                    if m is None:
                        cells += ["—"] * (6 if more else 4)
                        continue
                    base = m["base_mb"]
                    steady = _steady_ratio(m, h) if h else None
                    cells += [f"{m['peak_mb']:.0f} MB",
                              _ratio(m["peak_mb"] / h["peak_mb"]) if h else "—",
                              f"{m['delta_mb']:.0f} MB",
                              _ratio(m["delta_mb"] / h["delta_mb"]) if h and h["delta_mb"] > 0
                              else "—"]
                    if more:
                        cells += [f"{m['steady_delta_mb']:.0f} MB" if m.get("steps", 1) > 1
                                  else "—", _ratio(steady) if steady is not None else "—"]
                L.append(f"| {H.LABELS[impl]} | "
                         + (f"{base:.0f} MB" if base is not None else "—") + " | "
                         + " | ".join(cells) + " |")
            L.append("")
    L += ["## Notes on the implementations", "",
          "- **unbatched eager**: the model code of `dynbatch/models` called once per example; "
          "the minibatch's losses are summed for one backward pass and one Adam step. Its "
          "training time is mostly the backward pass: every leaf's `nn.Embedding` lookup "
          "yields a dense vocabulary × embedding gradient that autograd accumulates one by one "
          "(for SST, 18,281 × 128 floats per leaf); batched implementations make one per "
          "minibatch.",
          "- **hand-batched**: `benchmarks/handbatched.py`, trees level by level by node height "
          "with `index_select` routing, the tagger padded and packed through `nn.LSTM` with the "
          "LSTMCells' own weights.",
          "- **dynbatch**: `@db.batched(strategy=...)` around the per-example code. *Per-op* is "
          "the model as written; *blocks* is a subclass whose `leaf`, `node` and `node_loss` "
          "are `db.block(...)` (SST Tree-LSTM only). `db.stats()` covers the forward run "
          "(trace, schedule, execute); the backward pass is ordinary autograd over the "
          "batched calls.",
          "- **DyNet autobatch** (`benchmarks/peers.py`): the same math written in DyNet, one "
          "computation graph per minibatch, `autobatch=1`; Adam with clipping off and dense "
          "updates so its step equals torch's; single-threaded (the PyPI wheel). It runs in a "
          "child process of its own, driven round by round from the interleaved loop and "
          "timing itself: merely importing dynet38 into a process makes PyTorch at 2 threads "
          "10–50× slower there (measured on this machine), which would corrupt every other "
          "figure.",
          "- **2 threads**: on this shared 2-core machine, whenever other work holds a core, "
          "PyTorch's second thread is waited for at every parallelised op, so 2-thread "
          "figures swing (now and then 10× down for a round); 1 thread is the steady figure.",
          "- **TorchFold** (`benchmarks/peers.py`): ops added to a `torchfold.Fold` per "
          "example and run depth by depth, one call per (depth, op); torchfold 0.1.0's "
          "`Fold.add` needs a one-line fix for current PyTorch (a type check against a class "
          "removed in PyTorch 0.4), done in a subclass. A Fold merges identical calls (the "
          "same word at two leaves of a minibatch is embedded once).",
          ""]
    L += ["## Reproduce", "",
          "```bash",
          "pip install -e '.[bench,dynet,torchfold]'    # the peers and the plot are optional",
          meta["command"] + "    # this report",
          "python scripts/bench.py                      # the full run (default outputs)",
          "python scripts/bench.py --quick              # a subset, a few minutes",
          "python scripts/bench.py --tasks sst128 --impls hand,dynbatch-blocks --sizes 64 "
          "--threads 1   # one cell",
          "```", ""]
    return "\n".join(L)


def _target_rounds(result: dict) -> str:
    cell = result["meta"].get("target_cell")
    if not cell or not _rows(result, task=cell["task"], batch=cell["batch"],
                             threads=cell["threads"]):
        return ""
    if (cell["rounds"], cell["examples"]) == (result["meta"]["config"]["repeats"],
                                              result["meta"]["examples_per_round"].get(
                                                  cell["batch"])):
        return ""
    return (f" ({cell['rounds']} of {cell['examples']} examples each in the cell of the "
            f"issue's targets, {cell['task']} at B={cell['batch']} with {cell['threads']} "
            "thread)")


def _load_range(result: dict) -> str:
    loads = [r["load"] for r in result["results"] if "load" in r]
    return f"{min(loads):.2f}–{max(loads):.2f}" if loads else "—"


def write_markdown(result: dict, path: Path, png: Path | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    png_name = None
    if png is not None and png.exists():
        try:
            png_name = str(png.resolve().relative_to(path.parent.resolve()))
        except ValueError:
            png_name = str(png.resolve())
    path.write_text(markdown(result, png_name))


def write_plot(result: dict, path: Path) -> str | None:
    """The speedup plot; returns why it was skipped, or None."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e .[bench]): no plot"
    tasks = list(result["tasks"])
    threads = result["meta"]["config"]["threads"][0]
    if not tasks or not any(r.get("train_x_eager") for r in result["results"]):
        return "no eager baseline in this run: no speedup plot"
    fig, axes = plt.subplots(2, len(tasks), figsize=(4.2 * len(tasks), 7.5), squeeze=False)
    for j, task in enumerate(tasks):
        for i, (mode, title) in enumerate((("train", "training"), ("infer", "inference"))):
            ax = axes[i][j]
            for impl in _impls(result, task):
                rows = sorted(_rows(result, task=task, impl=impl, threads=threads),
                              key=lambda r: r["batch"])
                pts = [(r["batch"], r.get(f"{mode}_x_eager")) for r in rows]
                pts = [(b, v) for b, v in pts if v]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=H.LABELS[impl],
                            color=plt.get_cmap("tab10")(H.IMPLS.index(impl)),
                            linestyle="--" if impl in ("dynet", "torchfold") else "-")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.axhline(1.0, color="grey", linewidth=0.8)
            ax.set_title(f"{task}: {title}, {threads} thread", fontsize=10)
            ax.set_xlabel("minibatch size")
            if j == 0:
                ax.set_ylabel("speedup over unbatched eager")
            ax.grid(True, which="both", alpha=0.3)
    legend = {}
    for ax in axes.flat:
        for h, l in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(l, h)
    fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=4, fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
