"""The benchmark harness behind scripts/bench.py: agreement check, interleaved timing, peak
memory in one fresh process per implementation, and the outputs (JSON, markdown, PNG).

Method, in one place:

* Every implementation of a task starts from a copy of one seeded model (DyNet copies its
  weights) and trains with Adam (lr 1e-3); all see the same minibatches.
* Agreement first: on the task's first minibatch, every implementation's per-example losses,
  inference outputs and parameter gradients are compared with the eager per-example code.
* Timing: for each (task, threads, minibatch size) cell, one untimed warm-up step per
  implementation, then ``repeats`` rounds; in each round every implementation runs in turn
  (A B C ... then C B A ..., alternating) a training pass (forward, backward, Adam step per
  minibatch) and an inference pass (no_grad) over the round's minibatches. Round r uses the
  r-th chunk of the data, the same chunk for every implementation. Throughput is the median
  over rounds; a ratio is the median of the per-round ratios, and the per-round ratios are
  kept. The cell the issue's targets are judged on (``TARGET_CELL``: SST 128/128, B=64, one
  thread) runs ``target_repeats`` rounds of ``target_examples`` examples, and the report
  gives the range of its per-round ratios beside each verdict. On this shared machine the
  blocks ratio ranged 0.54-0.84 between whole runs of the same code with three rounds of
  one minibatch each (a verdict decided by one unlucky round); over the nine rounds of
  one run it ranged 0.36-0.95 with rounds of one minibatch (some 0.15 s, as long as a
  burst of another tenant's work), and 0.41-0.93 with rounds of 256 trees (0.55-0.70 in a
  run of that cell alone, where a round is over sooner: ``scripts/bench.py --tasks sst128
  --impls hand,dynbatch-blocks-agenda --sizes 64 --threads 1 --no-memory``). The median
  of nine is the figure to quote; the range says how far one round can be trusted.
* Unbatched eager is timed on at most ``eager_examples`` examples per round (the first ones
  of the round's chunk, as one minibatch): its per-example cost does not depend on the
  minibatch size, and a full minibatch of 256 would take longer than the rest of the cell.
* Peak memory: the resident high-water mark (VmHWM) of a fresh interpreter per (task,
  implementation) that loads the same data and weights, builds the implementation, runs one
  training step on one example (the base: library code paged in, parameters, Adam state,
  DyNet's pool; the high-water mark is then lowered to it, ``reset_peak_rss``), then
  ``memory_steps`` training steps on distinct minibatches at each memory size, ascending:
  the peak after the first step, and after the last. The second is what training holds
  once the allocators keep what earlier steps left them. Over 16 steps at SST B=64
  (``scripts/bench.py --tasks sst128 --impls hand,dynbatch-agenda,dynbatch-blocks-agenda
  --sizes 64 --threads 1 --repeats 1 --memory-steps 16``) the Δ rose from 40.4 to 57.7 MB
  per-op, from 21.9 to 29.2 hand-batched and from 29.3 to 33.9 with blocks. The worker runs
  with glibc's mmap threshold fixed (``MALLOC_MMAP_THRESHOLD_``): left dynamic, it rises
  after the first large free, and whether later tensors land on the heap (and stay
  resident once freed) then depends on allocation history. Hand-batched's AST Δ at B=64
  ranged 19-45 MB over three identical processes; with both measures, 20.2-20.4 MB.
* DyNet runs in a child process of its own (``ProcessRunner``), driven round by round from
  the same interleaved loop: importing it slows PyTorch at 2 threads 10-50x in-process.
"""
from __future__ import annotations

import copy
import gc
import json
import math
import os
import pickle
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

import dynbatch as db
from benchmarks import tasks as T

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench.py"

# "-wN": the same implementation with each minibatch planned in N DataLoader workers
# (LoaderRunner): dynbatch through db.DataLoader, hand-batched with its routing made there.
WORKERS = {"hand-w1": ("hand", 1), "dynbatch-agenda-w1": ("dynbatch-agenda", 1),
           "dynbatch-agenda-w2": ("dynbatch-agenda", 2),
           "dynbatch-blocks-agenda-w1": ("dynbatch-blocks-agenda", 1),
           "dynbatch-blocks-agenda-w2": ("dynbatch-blocks-agenda", 2)}
IMPLS = ("eager", "hand", "hand-w1", "dynbatch-agenda", "dynbatch-agenda-w1",
         "dynbatch-agenda-w2", "dynbatch-depth", "dynbatch-blocks-agenda",
         "dynbatch-blocks-agenda-w1", "dynbatch-blocks-agenda-w2", "dynbatch-blocks-depth",
         "dynet", "torchfold")
ALIASES = {
    "dynbatch": ("dynbatch-agenda", "dynbatch-agenda-w1", "dynbatch-agenda-w2",
                 "dynbatch-depth", "dynbatch-blocks-agenda", "dynbatch-blocks-agenda-w1",
                 "dynbatch-blocks-agenda-w2", "dynbatch-blocks-depth"),
    "workers": tuple(WORKERS),
    "dynbatch-perop": ("dynbatch-agenda", "dynbatch-depth"),
    "dynbatch-blocks": ("dynbatch-blocks-agenda", "dynbatch-blocks-depth"),
    "peers": ("dynet", "torchfold"),
    "all": IMPLS,
}
LABELS = {
    "eager": "unbatched eager",
    "hand": "hand-batched",
    "hand-w1": "hand-batched, routing in 1 worker",
    "dynbatch-agenda": "dynbatch per-op, agenda",
    "dynbatch-agenda-w1": "dynbatch per-op, agenda, 1 worker",
    "dynbatch-agenda-w2": "dynbatch per-op, agenda, 2 workers",
    "dynbatch-blocks-agenda-w1": "dynbatch blocks, agenda, 1 worker",
    "dynbatch-blocks-agenda-w2": "dynbatch blocks, agenda, 2 workers",
    "dynbatch-depth": "dynbatch per-op, depth",
    "dynbatch-blocks-agenda": "dynbatch blocks, agenda",
    "dynbatch-blocks-depth": "dynbatch blocks, depth",
    "dynet": "DyNet autobatch",
    "torchfold": "TorchFold",
}
TARGET_CELL = ("sst128", 64, 1)     # (task, minibatch size, torch threads) of the targets
DEFAULT_SIZES = (1, 16, 64, 256)
DEFAULT_THREADS = (1, 2)
MEMORY_SIZES = (64, 256)
MEMORY_STEPS = 8        # training steps per memory size (distinct minibatches)
LR = 1e-3
EAGER_MEMORY_MAX = 64  # largest minibatch at which eager's peak memory is measured
# float32 agreement tolerances: losses relative, outputs absolute, gradients relative to the
# largest reference gradient entry of each parameter.
TOL_LOSS, TOL_OUT, TOL_GRAD = 1e-4, 1e-4, 1e-3


@dataclass
class Config:
    tasks: tuple = T.TASKS
    impls: tuple = IMPLS
    sizes: tuple = DEFAULT_SIZES
    threads: tuple = DEFAULT_THREADS
    repeats: int = 3
    target_repeats: int = 9      # rounds of TARGET_CELL (at least ``repeats``)
    target_examples: int = 256   # examples per round of TARGET_CELL (at least ``examples``)
    limit: int = 1024
    examples: int = 64           # examples per timed round (at least one minibatch)
    eager_examples: int = 8      # eager's cap per round
    memory_sizes: tuple = MEMORY_SIZES
    memory_impls: tuple = IMPLS
    memory_tasks: tuple = T.TASKS
    memory_steps: int = MEMORY_STEPS
    sst_dir: str = ""
    tiny: bool = False
    quick: bool = False
    command: str = ""
    out_md: str = ""
    out_json: str = ""
    out_png: str = ""


def log(msg: str = "") -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------
# runners: one object per (task, implementation), the timing loop's only interface


class TorchRunner:
    """A PyTorch implementation with its own copy of the model and its own Adam."""

    def __init__(self, impl: T.TorchImpl, model: nn.Module, fold=None) -> None:
        self.name = impl.name
        self.impl = impl
        self.model = impl.prepare(model)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=LR)
        self.fold = fold
        self.stats: dict | None = None

    def _grab(self) -> None:
        if self.impl.uses_dynbatch:
            s = db.stats()
            self.stats = {"batches": s.batches, "nodes": s.nodes, "trace_s": s.trace_s,
                          "schedule_s": s.schedule_s, "execute_s": s.execute_s}
        elif self.fold is not None:
            self.stats = {"batches": self.fold.groups}

    def train_step(self, batch: list) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss = self.impl.losses(self.model, batch).sum()
        self._grab()
        loss.backward()
        self.opt.step()

    def infer(self, batch: list):
        with torch.no_grad():
            out = self.impl.infer(self.model, batch)
        self._grab()
        return out

    def agreement(self, batch: list):
        outputs = self.infer(batch).double().numpy()
        self.model.zero_grad(set_to_none=True)
        losses = self.impl.losses(self.model, batch)
        losses.sum().backward()
        grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)).double().numpy()
                 for n, p in self.model.named_parameters()}
        self.model.zero_grad(set_to_none=True)
        return losses.detach().double().numpy(), outputs, grads


class DynetAdapter:
    def __init__(self, runner) -> None:
        self.name = "dynet"
        self.runner = runner
        self.stats = None

    def train_step(self, batch):
        self.runner.train_step(batch)

    def infer(self, batch):
        return self.runner.infer(batch)

    def agreement(self, batch):
        losses, outputs, grads = self.runner.agreement(batch)
        return losses, outputs.astype(np.float64), {k: v.astype(np.float64)
                                                    for k, v in grads.items()}


def run_round(runner, mode: str, batches: list[list]) -> tuple[float, list]:
    """Seconds to run ``batches`` (training steps or inference calls), and each call's stats."""
    step = runner.train_step if mode == "train" else runner.infer
    stats = []
    gc.collect()
    t0 = time.perf_counter()
    for mb in batches:
        step(mb)
        stats.append(runner.stats)
    return time.perf_counter() - t0, stats


class LocalRunner:
    """Runs an implementation in this process; minibatches arrive as example indices."""

    def __init__(self, runner, examples: list) -> None:
        self.runner, self.examples = runner, examples

    def round(self, mode: str, idx: list[list[int]]) -> tuple[float, list]:
        ex = self.examples
        return run_round(self.runner, mode, [[ex[i] for i in mb] for mb in idx])

    def agreement(self, idx: list[int]):
        return self.runner.agreement([self.examples[i] for i in idx])

    def close(self) -> None:
        pass


class _Minibatches:
    """A batch sampler whose minibatches the runner sets before each pass."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _hand_routing(trees):
    from benchmarks import handbatched as hb
    return len(trees), hb.binary_routing(trees)


class LoaderRunner:
    """An implementation whose minibatches are planned ahead in DataLoader workers:
    dynbatch through db.DataLoader, hand-batched with its routing (every index list, one
    tensor) made by the loader's collate function. Workers persist across rounds, as
    across an epoch; they start in the untimed warm-up round.

    NOTE [steady state]: a loader round runs its K minibatches over and over, 16 steps at
    least (4 in a --tiny run, which checks the harness, not speed), and times only the second half of them, scaled to K steps: the pipeline's fill
    is left out (the main process waiting for the first plan, paid once per epoch), and
    so are the plans that the workers made side by side during the fill (at most
    ``prefetch_factor`` x workers), which would let the next steps run without waiting.
    What is timed is then each step costing the slower of the main process's step and a
    worker's planning over the number of workers, as through an epoch.
    """

    def __init__(self, task: T.TaskData, name: str, model: nn.Module, steps: int = 16) -> None:
        base, workers = WORKERS[name]
        self.name = name
        self.steps = steps          # a round's steps at least (NOTE [steady state])
        self.runner = make_runner(task.name, base, model)     # model, Adam, stats
        self.examples = task.examples
        self.stats = None
        self.loaders = {}
        impl = self.runner.impl
        for mode in ("train", "infer"):
            sampler = _Minibatches()
            if impl.batched is not None:
                fn, join = impl.batched[mode]
                loader = db.DataLoader(task.examples, fn, self.runner.model,
                                       batch_sampler=sampler, num_workers=workers,
                                       persistent_workers=True)
                step = (lambda batch, fn=fn, join=join: join(fn(batch, self.runner.model)))
            else:
                from benchmarks import handbatched as hb
                loader = torch.utils.data.DataLoader(
                    task.examples, batch_sampler=sampler, num_workers=workers,
                    persistent_workers=True, collate_fn=_hand_routing)
                fn = hb.handbatched_binary_treelstm_loss if mode == "train" else \
                    hb.handbatched_binary_treelstm_root_logits
                step = (lambda routed, fn=fn: fn(self.runner.model, range(routed[0]),
                                                 routed[1]))
            self.loaders[mode] = (sampler, loader, step)

    def _train(self, batch) -> None:
        runner = self.runner
        runner.opt.zero_grad(set_to_none=True)
        loss = self.loaders["train"][2](batch).sum()
        runner._grab()
        loss.backward()
        runner.opt.step()

    def _infer(self, batch):
        with torch.no_grad():
            out = self.loaders["infer"][2](batch)
        self.runner._grab()
        return out

    def round(self, mode: str, idx: list[list[int]]) -> tuple[float, list]:
        K = len(idx)
        todo = idx * -(-self.steps // K)
        sampler, loader, _ = self.loaders[mode]
        sampler.batches = todo
        step = self._train if mode == "train" else self._infer
        stats, ends = [], []
        gc.collect()
        with torch.set_grad_enabled(mode == "train"):    # asked for as they will run
            for batch in loader:
                step(batch)
                stats.append(self.runner.stats)
                ends.append(time.perf_counter())
        half = len(ends) // 2
        per_step = (ends[-1] - ends[half - 1]) / (len(ends) - half)
        return per_step * K, stats[-K:]

    def agreement(self, idx: list[int]):
        """Losses, outputs and gradients of one minibatch through the loaders."""
        out = {}
        for mode in ("infer", "train"):
            sampler, loader, step = self.loaders[mode]
            sampler.batches = [idx]
            if mode == "infer":
                with torch.no_grad():
                    (batch,) = list(loader)
                    out[mode] = step(batch).double().numpy()
            else:
                (batch,) = list(loader)
                model = self.runner.model
                model.zero_grad(set_to_none=True)
                losses = step(batch)
                losses.sum().backward()
                grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p))
                         .double().numpy() for n, p in model.named_parameters()}
                model.zero_grad(set_to_none=True)
                out[mode] = (losses.detach().double().numpy(), grads)
        return out["train"][0], out["infer"], out["train"][1]

    def close(self) -> None:
        self.loaders.clear()


def _peer_main(conn, data_path: str, name: str) -> None:
    """The child process of a ProcessRunner: builds the implementation from the pickled
    task and weights, then answers ("round", mode, idx) / ("agreement", idx) / ("close",)."""
    try:
        torch.set_num_threads(1)
        with open(data_path, "rb") as f:
            task, state = pickle.load(f)
        model = T.make_model(task)
        model.load_state_dict(state)
        runner = make_runner(task.name, name, model)   # a copy: ``model`` stays as loaded
        conn.send(("ok", None))
    except Exception as err:
        conn.send(("error", f"{type(err).__name__}: {err}"))
        return
    local = LocalRunner(runner, task.examples)
    while True:
        msg = conn.recv()
        if msg[0] == "close":
            return
        try:
            if msg[0] == "round":
                dt, _ = local.round(msg[1], msg[2])
                conn.send(("ok", dt))
            else:  # on a fresh copy of the initial weights: DyNet cannot drop gradients
                fresh = make_runner(task.name, name, model)
                conn.send(("ok", LocalRunner(fresh, task.examples).agreement(msg[1])))
        except Exception as err:
            conn.send(("error", f"{type(err).__name__}: {err}"))


class ProcessRunner:
    """Runs an implementation in a child process of its own, driven step by step from the
    interleaved loop; the child times its own rounds (no data crosses the pipe while the
    clock runs). Used for DyNet: merely importing it makes PyTorch at 2 threads 10-50x
    slower in the same process (measured here), which would corrupt every other figure."""

    def __init__(self, name: str, data_path: Path) -> None:
        import multiprocessing
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_peer_main, args=(child, str(data_path), name),
                                daemon=True)
        self.proc.start()
        child.close()
        self._call_reply()

    def _call_reply(self, *msg):
        if msg:
            self.conn.send(msg)
        status, value = self.conn.recv()
        if status != "ok":
            raise RuntimeError(value)
        return value

    def round(self, mode: str, idx: list[list[int]]) -> tuple[float, list]:
        dt = self._call_reply("round", mode, idx)
        return dt, [None] * len(idx)

    def agreement(self, idx: list[int]):
        return self._call_reply("agreement", idx)

    def close(self) -> None:
        try:
            self.conn.send(("close",))
        except OSError:
            pass
        self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.kill()


def unavailable(task: str, name: str) -> str | None:
    """Why ``name`` does not run on ``task`` (None: it does)."""
    if name in ("dynet", "torchfold") and task == "tagger-lstm":
        return "the peers run the tagger task (the nn.LSTM form is PyTorch's own)"
    if name == "dynet":
        # Only look: importing DyNet into this process would slow PyTorch (ProcessRunner).
        import importlib.util
        if importlib.util.find_spec("dynet") is None:
            return "DyNet not installed; install with `pip install -e .[dynet]` (PyPI dynet38)"
        return None
    if name == "torchfold":
        from benchmarks import peers
        return peers.torchfold_status()
    if name == "hand-w1" and task not in ("sst128", "sst300"):
        return "routing made ahead for the binary Tree-LSTM only"
    if T.torch_impl(task, WORKERS.get(name, (name,))[0]) is None:
        return "blocks form defined for the SST Tree-LSTM only"
    return None


def in_own_process(name: str) -> bool:
    return name == "dynet"


def timing_runner(task: T.TaskData, name: str, model: nn.Module, data_path: Path,
                  steps: int = 16):
    """What the timing loop and the agreement check drive: in this process, or in a child."""
    if in_own_process(name):
        return ProcessRunner(name, data_path)
    if name in WORKERS:
        return LoaderRunner(task, name, model, steps)
    return LocalRunner(make_runner(task.name, name, model), task.examples)


def make_runner(task: str, name: str, model: nn.Module):
    """A fresh runner on a deep copy of ``model`` (the model itself is never trained)."""
    model = copy.deepcopy(model)
    if name == "dynet":
        from benchmarks import peers
        return DynetAdapter(peers.dynet_runner(task, model, LR))
    if name == "torchfold":
        from benchmarks import peers
        fold = peers.TorchFoldImpl(task)
        impl = T.TorchImpl("torchfold", fold.losses, fold.infer)
        return TorchRunner(impl, model, fold=fold)
    return TorchRunner(T.torch_impl(task, name), model)


# ---------------------------------------------------------------------------------------
# agreement


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    scale = max(float(np.abs(b).max()) if b.size else 0.0, 1e-6)
    return float(np.abs(a - b).max()) / scale if a.size else 0.0


def check_agreement(task: T.TaskData, model: nn.Module, runners: dict, idx: list[int]) -> dict:
    """Max differences of every runner against eager on the examples ``idx``. Runs before
    any training step: the runners still hold the initial weights, and leave them so."""
    batch = [task.examples[i] for i in idx]
    ref_loss, ref_out, ref_grad = make_runner(task.name, "eager", model).agreement(batch)
    report = {}
    for name, runner in runners.items():
        if name == "eager":
            lo, out, gr = ref_loss, ref_out, ref_grad
        else:
            try:
                lo, out, gr = runner.agreement(idx)
            except Exception as err:  # report, never hide: the run goes on without it
                report[name] = {"ok": False, "error": f"{type(err).__name__}: {err}"}
                log(f"  agreement {name:24s} ERROR {type(err).__name__}: {err}")
                continue
        d_loss = float(np.abs(lo - ref_loss).max())
        d_loss_rel = float((np.abs(lo - ref_loss) / np.maximum(1.0, np.abs(ref_loss))).max())
        d_out = float(np.abs(out - ref_out).max()) if out.shape == ref_out.shape else math.inf
        d_grad = max((_rel(gr[k], ref_grad[k]) for k in ref_grad if k in gr), default=0.0)
        missing = sorted(set(ref_grad) - set(gr))
        ok = d_loss_rel <= TOL_LOSS and d_out <= TOL_OUT and d_grad <= TOL_GRAD and not missing
        report[name] = {"ok": ok, "loss_max_abs": d_loss, "loss_max_rel": d_loss_rel,
                        "output_max_abs": d_out, "grad_max_rel": d_grad,
                        "loss_total": float(lo.sum()), "loss_total_eager": float(ref_loss.sum())}
        log(f"  agreement {name:24s} {'OK  ' if ok else 'FAIL'} loss max diff {d_loss:.2e} "
            f"(rel {d_loss_rel:.1e}), outputs {d_out:.2e}, grads rel {d_grad:.1e}"
            + (f", missing grads {missing}" if missing else ""))
    return report


# ---------------------------------------------------------------------------------------
# timing


def examples_per_round(cfg: Config, B: int) -> int:
    return max(B, min(cfg.examples, 8 * B))


def cell_plan(cfg: Config, task: str, B: int, threads: int) -> tuple[int, int]:
    """(rounds, examples per round) of a cell; the target cell gets more of both."""
    n = examples_per_round(cfg, B)
    if (task, B, threads) == TARGET_CELL:
        return max(cfg.repeats, cfg.target_repeats), max(n, cfg.target_examples)
    return cfg.repeats, n


def _cell_work(cfg: Config, task: str, B: int, threads: int) -> int:
    repeats, n = cell_plan(cfg, task, B, threads)
    return n * repeats // cfg.repeats       # in units of a default cell's examples


def _rounds_data(task: T.TaskData, B: int, repeats: int, n: int) -> list[list[list[int]]]:
    """Per round, its minibatches as example indices (round r: the r-th chunk of n
    examples, wrapping)."""
    k = max(1, n // B)
    total = len(task.examples)
    rounds = []
    for r in range(repeats):
        start = (r * n) % total
        chunk = [(start + j) % total for j in range(k * B)]
        rounds.append([chunk[i * B:(i + 1) * B] for i in range(k)])
    return rounds


def _eager_batches(mbs: list[list], cap: int) -> list[list]:
    flat = [x for mb in mbs for x in mb]
    B = len(mbs[0])
    if B >= cap:
        return [flat[:cap]]
    return [flat[i:i + B] for i in range(0, min(cap, len(flat)), B)]


def _mean_stats(acc: list[dict]) -> dict | None:
    if not acc or acc[0] is None:
        return None
    return {k: sum(a[k] for a in acc) / len(acc) for k in acc[0]}


def time_cell(task: T.TaskData, runners: dict, cfg: Config, B: int, threads: int,
              errors: dict) -> list[dict]:
    """Interleaved rounds over every runner; one result row per implementation. A runner
    that raises is reported in ``errors``, dropped from ``runners`` and from the cell.

    NOTE [interleaving]: each implementation runs all of a round's minibatches in a row,
    as a user trains with it, not minibatch by minibatch in turn with the others. Taking
    turns step by step does steady the per-round ratios (this shared machine's speed
    drifts over seconds), but it also favours dynbatch, as if a dynbatch step that
    follows a hand-batched step ran faster than one that follows a dynbatch step. Hand-batched
    against blocks, 9 rounds of 4 minibatches of 64 SST trees, both ways on the same
    rounds (``python benchmarks/interleaving.py``; in the first three runs round by round
    always went first, in the fourth the first way alternated), four times: ranges 0.42-0.84,
    0.50-0.82, 0.57-0.69, 0.47-0.85 round by round and 0.57-0.76, 0.59-0.75, 0.61-0.74,
    0.62-0.82 step by step, but medians 0.61, 0.66, 0.63, 0.66 against 0.69, 0.67, 0.68,
    0.72; in the fourth run, blocks' median round was 4% shorter step by step and
    hand-batched's 2% longer. A steadier figure that is 2-13% too kind is not a
    trustworthy verdict, so rounds stay whole, and their spread is reported instead.
    """
    repeats, per_round = cell_plan(cfg, task.name, B, threads)
    rounds = _rounds_data(task, B, repeats, per_round)
    batches = {name: (lambda mbs, name=name: _eager_batches(mbs, cfg.eager_examples)
                      if name == "eager" else mbs) for name in runners}

    def drop(name, err):  # e.g. an engine mid-change: report, go on without it
        errors[f"{task.name}/{name}"] = f"threads={threads} B={B}: {type(err).__name__}: {err}"
        log(f"  {name} failed, dropped from the rest of this task: {type(err).__name__}: {err}")
        runners.pop(name).close()

    for name in list(runners):  # warm-up, untimed: allocator, caches, first-call costs
        first = batches[name](rounds[0])[:1]
        try:
            runners[name].round("train", first)
            runners[name].round("infer", first)
        except Exception as err:
            drop(name, err)
    rec = {name: {"train": [], "infer": [], "train_stats": [], "infer_stats": [],
                  "examples": 0} for name in runners}
    for r, mbs in enumerate(rounds):
        order = list(runners) if r % 2 == 0 else list(runners)[::-1]
        for name in order:
            if name not in runners:  # dropped earlier in this round
                continue
            todo = batches[name](mbs)
            n = sum(len(mb) for mb in todo)
            rec[name]["examples"] = n
            try:
                for mode in ("train", "infer"):
                    dt, stats = runners[name].round(mode, todo)
                    rec[name][mode].append(n / dt)
                    rec[name][f"{mode}_stats"].append(_mean_stats(stats))
            except Exception as err:
                drop(name, err)
                del rec[name]
    names = [n for n in rec if n in runners]
    rows = []
    for name in names:
        d = rec[name]
        row = {"task": task.name, "impl": name, "threads": threads, "batch": B,
               "examples_timed": d["examples"], "rounds": repeats,
               "eager_capped": name == "eager" and d["examples"] < per_round,
               "train_eps": statistics.median(d["train"]), "train_runs": d["train"],
               "infer_eps": statistics.median(d["infer"]), "infer_runs": d["infer"]}
        for mode in ("train", "infer"):
            st = [s for s in d[f"{mode}_stats"] if s is not None]
            if st:
                row[f"{mode}_stats"] = {k: statistics.median(s[k] for s in st) for k in st[0]}
        rows.append(row)
    for mode in ("train", "infer"):
        for ref in ("eager", "hand"):
            if ref not in rec:
                continue
            for row in rows:
                ratios = [a / b for a, b in zip(rec[row["impl"]][mode], rec[ref][mode])]
                row[f"{mode}_x_{ref}"] = statistics.median(ratios)
                row[f"{mode}_x_{ref}_runs"] = ratios
    return rows


# ---------------------------------------------------------------------------------------
# memory: a fresh interpreter per (task, implementation)


def peak_rss_mb() -> float:
    """This process's resident high-water mark. VmHWM belongs to the address space, so a
    fresh interpreter starts its own; ``ru_maxrss`` is not used because Linux carries it
    over from the parent through fork and exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Lower the high-water mark to the current resident size (Linux: ``5`` into
    clear_refs). Without it, a transient peak of the set-up (unpickling the data, building
    the implementation) hides every step that stays below it: SST's base sat 130 MB above
    the resident size, and a B=64 step showed a Δ of a few MB or none."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_worker(spec_path: str) -> None:
    """Entry point of the child process (``bench.py --memory-worker SPEC``): prints JSON."""
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(1)
    with open(spec["data"], "rb") as f:
        task, state = pickle.load(f)
    model = T.make_model(task)
    model.load_state_dict(state)
    before = peak_rss_mb()
    runner = make_runner(task.name, spec["impl"], model)
    del model
    # One step on one example first: the library code it pages in, the implementation's
    # parameters, Adam's state (and DyNet's preallocated pool) then sit in the base, and
    # the Δ over it is what the minibatch itself costs.
    runner.train_step(task.examples[:1])
    gc.collect()
    reset = reset_peak_rss()
    base = peak_rss_mb()
    out = {"impl": spec["impl"], "task": task.name, "base_mb": base, "before_mb": before,
           "peak_reset": reset, "sizes": {}}
    steps = spec.get("steps", 1)
    for B in spec["sizes"]:
        for k, mb in enumerate(T.minibatches(task.examples, B, steps)):
            gc.collect()
            t0 = time.perf_counter()
            runner.train_step(mb)
            if k == 0:
                first = {"peak_mb": peak_rss_mb(), "step_s": time.perf_counter() - t0}
        out["sizes"][str(B)] = {**first, "steps": steps, "steady_peak_mb": peak_rss_mb()}
    print("MEMORY " + json.dumps(out), flush=True)


# one intra-op thread; a fixed mmap threshold so that resident memory follows live memory
# (see the module docstring): 128 KiB, glibc's own starting value
MEMORY_WORKER_ENV = {"OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}


def measure_memory(task: T.TaskData, names: list[str], sizes: list[int], workdir: Path,
                   data: Path, steps: int = 1) -> list[dict]:
    rows = []
    for name in names:
        spec = workdir / f"{task.name}-{name}.json"
        # Eager at B=256 would take minutes; its graph (one per example) grows linearly in B.
        todo = [b for b in sizes if b <= EAGER_MEMORY_MAX] if name == "eager" else sizes
        if not todo:
            continue
        # eager's steps take a minute or more: one each
        spec.write_text(json.dumps({"data": str(data), "impl": name, "sizes": todo,
                                    "steps": 1 if name == "eager" else steps}))
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(SCRIPT), "--memory-worker", str(spec)],
                              capture_output=True, text=True, cwd=ROOT,
                              env={**os.environ, **MEMORY_WORKER_ENV})
        line = next((l for l in proc.stdout.splitlines() if l.startswith("MEMORY ")), None)
        if proc.returncode != 0 or line is None:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            log(f"  memory {name}: worker failed ({proc.returncode}): {' | '.join(tail)}")
            continue
        res = json.loads(line[len("MEMORY "):])
        if not res.get("peak_reset", True):
            log(f"  memory {name}: could not reset the high-water mark (no "
                "/proc/self/clear_refs); the set-up's peak may hide part of each step")
        for B, v in res["sizes"].items():
            rows.append({"task": task.name, "impl": name, "batch": int(B),
                         "base_mb": res["base_mb"], "before_mb": res["before_mb"],
                         "peak_mb": v["peak_mb"],
                         "delta_mb": v["peak_mb"] - res["base_mb"],
                         "steps": v.get("steps", 1),
                         "steady_delta_mb": v.get("steady_peak_mb", v["peak_mb"])
                         - res["base_mb"]})
        log(f"  memory {name:24s} base {res['base_mb']:.0f} MB, peak "
            + ", ".join(f"B={B}: {v['peak_mb']:.0f} MB"
                        + (f" ({v['steady_peak_mb']:.0f} after {v['steps']} steps)"
                           if v.get("steps", 1) > 1 else "")
                        for B, v in res["sizes"].items())
            + f" ({time.perf_counter() - t0:.0f} s)")
    return rows


# ---------------------------------------------------------------------------------------
# the run


def _git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "dynbatch"], cwd=ROOT,
                               text=True, capture_output=True).stdout.strip()
        return head + (" (dynbatch/ modified)" if dirty else "")
    except OSError:
        return "?"


def _version(mod: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(mod)
    except Exception:
        return None


def machine_info() -> dict:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem,
            "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "numpy": np.__version__,
            "dynbatch": getattr(db, "__version__", "?"), "git": _git_commit(),
            "dynet": _version("dynet38") or _version("dynet"),
            "torchfold": _version("torchfold"), "matplotlib": _version("matplotlib")}


class Progress:
    """One line per cell on stderr: where the run is, elapsed, an estimate of what is left."""

    def __init__(self, work: list[float]) -> None:
        self.work, self.done, self.t0 = work, 0, time.perf_counter()

    def step(self, msg: str) -> None:
        self.done += 1
        el = time.perf_counter() - self.t0
        frac = sum(self.work[:self.done]) / max(sum(self.work), 1e-9)
        left = el / frac - el if frac > 0 else 0
        log(f"[{self.done}/{len(self.work)} cells, {_dur(el)} elapsed, ~{_dur(left)} left, "
            f"load {os.getloadavg()[0]:.2f}] {msg}")


def _dur(s: float) -> str:
    return f"{int(s // 60)}m{int(s % 60):02d}s" if s >= 60 else f"{s:.0f}s"


def _times_here(cfg: Config, name: str, task: str, B: int, threads: int) -> bool:
    """Loader rows (WORKERS) time 16 steps a round: by default only in the target cell
    (every cell of a --quick or --tiny run)."""
    return name not in WORKERS or (task, B, threads) == TARGET_CELL or cfg.quick or cfg.tiny


def run(cfg: Config) -> dict:
    t_start = time.perf_counter()
    meta = {"command": cfg.command, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "load_start": os.getloadavg(), "machine": machine_info(),
            "config": {k: v for k, v in asdict(cfg).items() if not k.startswith("out_")},
            "examples_per_round": {B: examples_per_round(cfg, B) for B in cfg.sizes},
            "target_cell": dict(zip(("task", "batch", "threads"), TARGET_CELL),
                                **dict(zip(("rounds", "examples"), cell_plan(cfg, *TARGET_CELL)))),
            "interop_threads": torch.get_num_interop_threads()}
    result = {"meta": meta, "tasks": {}, "results": [], "memory": [], "skipped": {},
              "errors": {}, "agreement_ok": True}
    log(f"dynbatch bench: {cfg.command}")
    log(f"machine: {meta['machine']['cpu']}, {meta['machine']['cores']} cores, "
        f"load {meta['load_start'][0]:.2f}; torch {torch.__version__}, "
        f"dynet {meta['machine']['dynet']}, torchfold {meta['machine']['torchfold']}")

    loaded = []
    for name in cfg.tasks:
        t0 = time.perf_counter()
        try:
            task = T.load_task(name, limit=cfg.limit, sst_dir=Path(cfg.sst_dir), tiny=cfg.tiny)
        except T.DataMissing as err:
            log(f"task {name}: skipped: {err}")
            result["skipped"][name] = str(err)
            continue
        log(f"task {name}: {task.source}; vocab {task.vocab_size}, dims "
            f"{task.embed}/{task.hidden} ({time.perf_counter() - t0:.1f} s)")
        loaded.append(task)

    cells = []  # (task, impl names, threads, B)
    plans = {}
    for task in loaded:
        names = []
        for name in cfg.impls:
            why = unavailable(task.name, name)
            if why is None:
                names.append(name)
            else:
                result["skipped"].setdefault(f"{task.name}/{name}", why)
                log(f"task {task.name}: {name} skipped: {why}")
        plans[task.name] = names
        for threads in cfg.threads:
            for B in cfg.sizes:
                cells.append((task, threads, B))
    progress = Progress([_cell_work(cfg, t.name, B, threads) * len(plans[t.name]) + 16
                         for t, threads, B in cells])

    workdir = Path(tempfile.mkdtemp(prefix="dynbatch-bench-"))
    try:
        for task in loaded:
            names = plans[task.name]
            model = T.make_model(task)
            torch.set_num_threads(1)
            agree_b = min(64, max(cfg.sizes), len(task.examples))
            log(f"task {task.name}: agreement with eager on the first minibatch "
                f"({agree_b} examples), float32")
            data_path = workdir / f"{task.name}.pkl"
            with open(data_path, "wb") as f:
                pickle.dump((task, model.state_dict()), f)
            runners = {}
            for n in names:
                try:
                    runners[n] = timing_runner(task, n, model, data_path,
                                               4 if cfg.tiny else 16)
                except Exception as err:
                    result["errors"][f"{task.name}/{n}"] = f"{type(err).__name__}: {err}"
                    log(f"  {n} failed to start: {type(err).__name__}: {err}")
            agreement = check_agreement(task, model, runners, list(range(agree_b)))
            result["tasks"][task.name] = {
                "info": task.info, "source": task.source, "examples": len(task.examples),
                "vocab": task.vocab_size, "classes": task.num_classes, "embed": task.embed,
                "hidden": task.hidden, "extra": task.extra, "agreement_batch": agree_b,
                "agreement": agreement}
            if not all(a["ok"] for a in agreement.values()):
                result["agreement_ok"] = False
            for n in [n for n in runners if "error" in agreement.get(n, {})]:
                runners.pop(n).close()
            names = list(runners)
            for threads in cfg.threads:
                torch.set_num_threads(threads)
                for B in cfg.sizes:
                    here = {n: r for n, r in runners.items()
                            if _times_here(cfg, n, task.name, B, threads)}
                    rows = time_cell(task, here, cfg, B, threads, result["errors"])
                    for n in [n for n in runners if n not in here and
                              _times_here(cfg, n, task.name, B, threads)]:
                        runners.pop(n)      # dropped by time_cell (it closed it)
                    for row in rows:
                        row["load"] = os.getloadavg()[0]
                    result["results"].extend(rows)
                    progress.step(f"{task.name} threads={threads} B={B}: " + ", ".join(
                        f"{r['impl']} {r['train_eps']:.0f}/{r['infer_eps']:.0f}" for r in rows)
                        + " ex/s train/infer")
            for runner in runners.values():
                runner.close()
            del runners
            torch.set_num_threads(1)
            mem_sizes = sorted(set(cfg.memory_sizes) & set(cfg.sizes)) or []
            mem_names = [n for n in names if n in cfg.memory_impls and n not in WORKERS]
            if mem_sizes and mem_names and task.name in cfg.memory_tasks:
                log(f"task {task.name}: peak memory, one process per implementation, "
                    f"B={mem_sizes}")
                result["memory"].extend(measure_memory(task, mem_names, mem_sizes, workdir,
                                                       data_path, cfg.memory_steps))
    finally:
        for p in workdir.iterdir():
            p.unlink()
        workdir.rmdir()
    meta["load_end"] = os.getloadavg()
    meta["seconds"] = time.perf_counter() - t_start
    return result
