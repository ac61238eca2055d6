"""scripts/bench.py in quick mode on tiny data: the harness runs end to end, every
implementation agrees with the eager per-example code, and the outputs are written.
Timings are never checked here (they belong to the benchmark, not to pass/fail tests)."""
from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch

import dynbatch as db

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def float64():
    # Overrides conftest's float64 fixture: the benchmark runs in float32, as users do.
    old_dtype, old_threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(old_dtype)
        torch.set_num_threads(old_threads)


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_script", ROOT / "scripts" / "bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _ptb(rng: random.Random, leaves: int) -> str:
    label = rng.randrange(5)
    if leaves == 1:
        return f"({label} w{rng.randrange(30)})"
    k = rng.randint(1, leaves - 1)
    return f"({label} {_ptb(rng, k)} {_ptb(rng, leaves - k)})"


@pytest.fixture
def tiny_sst(tmp_path: Path) -> Path:
    """A few SST-format trees, so the test needs no data download and runs anywhere."""
    rng = random.Random(0)
    d = tmp_path / "sst"
    d.mkdir()
    (d / "train.txt").write_text("\n".join(_ptb(rng, rng.randint(1, 9)) for _ in range(12)) + "\n")
    return d


def test_quick_tiny_run_agrees_and_writes_outputs(tmp_path: Path, tiny_sst: Path, capsys):
    from benchmarks import peers

    out = tmp_path / "out"
    rc = _bench_module().main([
        "--quick", "--tiny", "--tasks", "sst128,ast,tagger", "--sizes", "4", "--repeats", "1",
        "--examples", "8", "--eager-examples", "4", "--memory-sizes", "4",
        "--memory-impls", "hand", "--memory-tasks", "sst128", "--sst-dir", str(tiny_sst),
        "--out", str(out)])
    assert rc == 0
    result = json.loads((out / "bench.json").read_text())
    assert result["agreement_ok"]

    expected = {"eager", "hand", "dynbatch-agenda", "dynbatch-depth", "dynbatch-agenda-w1",
                "dynbatch-agenda-w2"}
    # Never import DyNet here: it slows PyTorch in the same process (harness.ProcessRunner).
    if importlib.util.find_spec("dynet") is not None:
        expected.add("dynet")
    if peers.torchfold_status() is None:
        expected.add("torchfold")
    for task in ("sst128", "ast", "tagger"):
        want = expected | ({"dynbatch-blocks-agenda", "dynbatch-blocks-depth", "hand-w1",
                            "dynbatch-blocks-agenda-w1", "dynbatch-blocks-agenda-w2"}
                           if task == "sst128" else set())
        agreement = result["tasks"][task]["agreement"]
        assert set(agreement) == want, task
        assert all(a["ok"] for a in agreement.values()), agreement
        timed = {r["impl"] for r in result["results"] if r["task"] == task}
        assert timed == want, task
        for r in result["results"]:
            assert r["train_eps"] > 0 and r["infer_eps"] > 0
    # One fresh process (the slow part of this test): hand-batched on sst128.
    assert [(m["task"], m["impl"]) for m in result["memory"]] == [("sst128", "hand")]
    memory = result["memory"][0]
    assert memory["peak_mb"] > 0 and memory["steps"] == 2     # --tiny: two steps a size
    # the high-water mark only rises: the peak after the last step is at least the first's
    assert memory["steady_delta_mb"] >= memory["delta_mb"]
    # dynbatch rows carry the engine's own counters.
    row = next(r for r in result["results"] if r["impl"] == "dynbatch-blocks-agenda")
    assert row["train_stats"]["batches"] >= 1 and "trace_s" in row["train_stats"]

    md = (out / "BENCHMARKS.md").read_text()
    assert "## Headline" in md and "## Peak memory" in md and "--tiny" in md
    assert "Δ over 2 steps" in md
    try:
        import matplotlib  # noqa: F401
        assert (out / "speedup.png").stat().st_size > 0
    except ImportError:
        assert "no plot" in capsys.readouterr().err


def test_missing_sst_skips_with_a_message(tmp_path: Path):
    from benchmarks import harness
    cfg = harness.Config(tasks=("sst128",), impls=("eager", "hand"), sizes=(2,), threads=(1,),
                         repeats=1, memory_sizes=(), sst_dir=str(tmp_path / "absent"),
                         tiny=True, limit=4)
    result = harness.run(cfg)
    assert "sst128" in result["skipped"] and "SST not found" in result["skipped"]["sst128"]
    assert result["results"] == []


def test_the_target_cell_runs_more_rounds_and_reports_their_spread():
    from benchmarks import harness, report
    bench = _bench_module()
    full = bench.config(bench.parse_args([]), [])
    assert harness.cell_plan(full, *harness.TARGET_CELL) == (9, 256)
    assert harness.cell_plan(full, "sst128", 256, 1) == (3, 256)
    assert harness.cell_plan(full, "sst128", 64, 2) == (3, 64)
    quick = bench.config(bench.parse_args(["--quick"]), ["--quick"])
    assert harness.cell_plan(quick, *harness.TARGET_CELL) == (3, 64)
    mine = bench.config(bench.parse_args(["--quick", "--target-repeats", "5"]), [])
    assert harness.cell_plan(mine, *harness.TARGET_CELL) == (5, 64)
    rounds = harness._rounds_data(type("Task", (), {"examples": list(range(300))}), 64, 9, 256)
    assert len(rounds) == 9 and all(len(r) == 4 and all(len(mb) == 64 for mb in r)
                                   for r in rounds)
    assert rounds[1][0][0] == 256 and rounds[1][0][44] == 0      # the data wraps around

    def row(impl, train, runs=None):
        r = {"task": "sst128", "impl": impl, "threads": 1, "batch": 64, "rounds": 3,
             "train_x_hand": train, "infer_x_hand": 1.0}
        if runs is not None:
            r["train_x_hand_runs"] = runs
            r["infer_x_hand_runs"] = [1.0] * 3
        return r
    result = {"results": [row("hand", 1.0, [1.0] * 3),
                          row("dynbatch-blocks-agenda", 0.66, [0.55, 0.66, 0.71])],
              "memory": []}
    lines = report.targets(result)
    assert "median of 3 interleaved rounds, then the range" in lines[0]
    blocks = next(x for x in lines if x.startswith("- blocks form, training"))
    assert "0.66× (not met; rounds 0.55–0.71, 1 of 3 ≥ 0.7)" in blocks
    # results written before the rounds were kept: the verdict alone
    del result["results"][1]["train_x_hand_runs"]
    blocks = next(x for x in report.targets(result) if x.startswith("- blocks form, training"))
    assert blocks.endswith("0.66× (not met)")


def test_each_implementation_runs_a_whole_round_in_a_row():
    # NOTE [interleaving] in benchmarks/harness.py: in each round every implementation
    # runs all its minibatches in one go (train, then infer), the order of implementations
    # alternating between rounds; eager runs its capped batches only; a runner that fails
    # is dropped.
    from benchmarks import harness
    calls = []

    class Fake:
        def __init__(self, name, seconds, fail_at=None):
            self.name, self.seconds, self.fail_at = name, seconds, fail_at

        def round(self, mode, idx):
            calls.append((self.name, mode, [list(mb) for mb in idx]))
            if self.fail_at is not None and len(calls) >= self.fail_at:
                raise RuntimeError("engine broke")
            return self.seconds * len(idx), [None] * len(idx)

        def close(self):
            pass

    task = type("Task", (), {"name": "sst128", "examples": list(range(40))})
    cfg = harness.Config(repeats=2, examples=8, eager_examples=2)
    runners = {"eager": Fake("eager", 1.0), "hand": Fake("hand", 0.5),
               "dynbatch-blocks-agenda": Fake("dynbatch-blocks-agenda", 2.0)}
    rows = harness.time_cell(task, runners, cfg, 4, 1, {})
    timed = calls[6:]                   # after one warm-up train and infer step each
    assert [(name, mode) for name, mode, _ in timed] == [
        ("eager", "train"), ("eager", "infer"), ("hand", "train"), ("hand", "infer"),
        ("dynbatch-blocks-agenda", "train"), ("dynbatch-blocks-agenda", "infer"),
        ("dynbatch-blocks-agenda", "train"), ("dynbatch-blocks-agenda", "infer"),
        ("hand", "train"), ("hand", "infer"), ("eager", "train"), ("eager", "infer")]
    assert [len(idx) for _, _, idx in timed[:6]] == [1, 1, 2, 2, 2, 2]   # whole rounds
    assert timed[2][2] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    by = {r["impl"]: r for r in rows}
    assert by["hand"]["train_eps"] == 8 / (2 * 0.5)            # 8 examples in 2 minibatches
    assert by["eager"]["train_eps"] == 2 / 1.0                 # its cap: one batch of 2
    assert by["dynbatch-blocks-agenda"]["train_x_hand"] == 0.25
    # a runner that raises is dropped and reported; the others finish the cell
    calls.clear()
    errors: dict = {}
    runners = {"hand": Fake("hand", 0.5), "dynbatch-agenda": Fake("dynbatch-agenda", 1.0, 6)}
    rows = harness.time_cell(task, runners, cfg, 4, 1, errors)
    assert [r["impl"] for r in rows] == ["hand"] and list(runners) == ["hand"]
    assert "engine broke" in errors["sst128/dynbatch-agenda"]


def test_interleaving_check_prints_both_ways(tiny_sst: Path, capsys):
    from benchmarks import interleaving
    interleaving.main(["--rounds", "2", "--batch", "2", "--minibatches", "2",
                       "--sst-dir", str(tiny_sst)])
    out = capsys.readouterr().out
    for way in ("round by round", "step by step"):
        line = next(x for x in out.splitlines() if x.strip().startswith(way))
        assert "median" in line and "range" in line and "hand" in line


def _dynbatch_bindings() -> dict:
    """Every function bound in a loaded dynbatch module, by (module, name)."""
    import sys
    return {(k, name): v for k, m in list(sys.modules.items())
            if m is not None and (k == "dynbatch" or k.startswith("dynbatch."))
            for name, v in list(vars(m).items()) if callable(v)}


def _unchanged(before: dict) -> bool:
    """Whether every binding of ``before`` is still the same object (modules loaded since
    may add more)."""
    after = _dynbatch_bindings()
    return all(after.get(k) is v for k, v in before.items())


def test_time_split_wraps_every_binding_and_puts_it_back():
    # benchmarks/time_split.py splits the engine's timings by wrapping its pipeline
    # functions from the outside: every binding (``from .x import f`` too), restored after;
    # a function that is not there is reported, not fatal.
    import sys
    import types
    spec = importlib.util.spec_from_file_location("time_split",
                                                  ROOT / "benchmarks" / "time_split.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    home, user = types.ModuleType("dynbatch._ts_home"), types.ModuleType("dynbatch._ts_user")
    home.f = user.g = lambda x: x + 1
    original = home.f
    calls = []
    sys.modules.update({home.__name__: home, user.__name__: user})
    try:
        with mod.Patches() as patches:
            assert patches.wrap("dynbatch._ts_home:f", lambda fn: lambda x: calls.append(x)
                                or fn(x))
            assert not patches.wrap("dynbatch._ts_home:absent", lambda fn: fn)
            assert not patches.wrap("dynbatch._ts_nowhere:f", lambda fn: fn)
            assert home.f(1) == user.g(2) - 1 == 2 and calls == [1, 2]
        assert home.f is original and user.g is original
        assert patches.missing == ["dynbatch._ts_home:absent", "dynbatch._ts_nowhere:f"]
    finally:
        del sys.modules[home.__name__], sys.modules[user.__name__]


def test_time_split_reports_every_phase(tiny_sst: Path, capsys):
    # benchmarks/time_split.py: the one-change instrument. Only its report's shape is
    # checked; the numbers are timings.
    spec = importlib.util.spec_from_file_location("time_split",
                                                  ROOT / "benchmarks" / "time_split.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    before = _dynbatch_bindings()
    mod.main(["--sst-dir", str(tiny_sst), "--batch", "4", "--minibatches", "2",
              "--rounds", "2"])
    assert _unchanged(before)                                           # unpatched after
    out = capsys.readouterr().out
    assert "hand " in out and "dynbatch-blocks-agenda " in out
    assert "forward" in out and "backward" in out
    for phase in ("trace", "set-up, results, close"):
        assert f"    {phase} " in out, out
    # each phase the engine's timings cover is split, or the function it needs is named
    missing = out.split("not found, so not split: ")[1] if "not found" in out else ""
    if "dynbatch.schedule:schedule" in missing or "dynbatch.plan:build" in missing:
        assert "    schedule + plan " in out
    else:
        assert "    schedule " in out and "    plan " in out, out
    if "dynbatch.gather:gather_inputs" in missing or "dynbatch.execute:execute" in missing:
        assert "    execute " in out
    else:
        assert "    gather " in out and "    batched calls " in out, out
        for name in ("BinaryTreeLSTM.leaf", "BinaryTreeLSTM.node", "BinaryTreeLSTM.node_loss"):
            assert name in out
    # --profile: ATen time per implementation and the bytes tracing allocates per node
    before = _dynbatch_bindings()
    mod.main(["--sst-dir", str(tiny_sst), "--batch", "4", "--minibatches", "1", "--profile"])
    assert _unchanged(before)                                           # unpatched after
    out = capsys.readouterr().out
    assert out.count("ATen self time") == 2
    per_node = out.split("tracing allocates ")[1].split()[0]
    assert per_node == "n/a" or 50 < int(per_node) < 5000, out
    # per-op code: the run lets go of most batch outputs it makes
    mod.main(["--sst-dir", str(tiny_sst), "--batch", "4", "--minibatches", "1", "--profile",
              "--impl", "dynbatch-agenda"])
    assert _unchanged(before)
    out = capsys.readouterr().out
    assert out.count("Python memory peak over the forward") == 2
    saved = [float(part.split()[0]) for part in out.split("tensors saved for backward ")[1:]]
    assert len(saved) == 2 and all(x > 0 for x in saved), out
    if "not measured" not in out:
        made = float(out.split("batch outputs made ")[1].split()[0])
        held = float(out.split("still held when the run closes ")[1].split()[0])
        assert held < made, out


def test_memory_phases_reports_each_phase_of_a_step(tiny_sst: Path, capsys):
    # benchmarks/memory_phases.py: resident memory by phase; only the report's shape
    from benchmarks import memory_phases
    from dynbatch import session
    execute = session.Run.execute
    memory_phases.main(["--sst-dir", str(tiny_sst), "--batch", "4", "--tiny"])
    assert session.Run.execute is execute                                 # unpatched after
    steps = [line for line in capsys.readouterr().out.splitlines()
             if line.strip().startswith("step ")]
    assert len(steps) == 3
    for line in steps:
        for phase in ("traced", "executed", "forward returned", "backward", "Adam"):
            assert f"{phase} +" in line or f"{phase} -" in line, line


def _in_git_checkout() -> bool:
    import subprocess
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"],
                              capture_output=True).returncode == 0
    except OSError:
        return False


def test_ab_rewrites_absolute_dynbatch_imports_only():
    # benchmarks/ab.py loads a revision's dynbatch/ as dynbatch_ab_old: its absolute imports
    # must name the copy (and code naming ``dynbatch`` after ``import dynbatch.x`` must find
    # it); relative imports, other packages and docstrings are left alone.
    from benchmarks.ab import rewrite_imports
    src = ('"""import dynbatch"""\nimport dynbatch as db\nimport torch, dynbatch.api  # c\n'
           'from dynbatch.data import (sst,\n    vocab)\nfrom . import trace\n'
           'import dynbatchx\ndef f():\n    import dynbatch.rules\n    return dynbatch.rules\n')
    assert rewrite_imports(src, "old") == (
        '"""import dynbatch"""\nimport old as db\nimport torch, old.api  # c\ndynbatch = old\n'
        'from old.data import (sst,\n    vocab)\nfrom . import trace\n'
        'import dynbatchx\ndef f():\n    import old.rules\n    dynbatch = old\n'
        '    return dynbatch.rules\n')


@pytest.mark.skipif(not _in_git_checkout(), reason="benchmarks/ab.py reads old code from git")
@pytest.mark.parametrize("flags", [["--mode", "train"], ["--impl", "blocks", "--mode", "infer"]])
def test_ab_runs_a_revision_against_the_working_tree(tiny_sst: Path, tmp_path: Path, flags):
    # The whole tool in its own process, HEAD against the working tree, on tiny SST-format
    # trees: both versions compute the same thing, and it reports the ratio to quote.
    import subprocess
    import sys
    out = tmp_path / "ab.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "ab.py"), "--rev", "HEAD", "--tiny",
         "--sst-dir", str(tiny_sst), "--batch", "4", "--minibatches", "2", "--rounds", "1",
         "--json", str(out), *flags], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "new/old step time: median " in done.stdout and "over 2 pairs" in done.stdout
    assert "WARNING" not in done.stdout, done.stdout
    result = json.loads(out.read_text())
    assert result["agree"] and result["ratio"]["pairs"] == 2 and result["ratio"]["median"] > 0
    for version in ("old", "new"):
        assert result[version]["step_ms_min"] > 0 and "trace_ms_median" in result[version]



def test_where_sorts_profiler_samples_into_the_parts_of_a_step():
    # benchmarks/where.py: py-spy's samples of the step loop -> shares of a step. The
    # sorting is checked on made-up stacks (py-spy itself is optional, and not run here),
    # and lines of source made up with them: by files, never the engine's own text.
    from benchmarks import where
    lines = {("dynbatch/gather.py", 23): "out = src.index_select(0, rows)",
             ("dynbatch/gather.py", 41): "for spec, ks in step.gathers:",
             ("dynbatch/rules/normalize.py", 75): "return self.fn(*args, **kwargs)",
             ("dynbatch/rules/normalize.py", 74): "args = [kwargs.pop(n) for n in names]",
             ("dynbatch/trace.py", 99): "node = Node(len(nodes), sig, inputs)"}

    def read_line(path, line):
        return lines.get((path, line), "")

    loop = ("<module> (benchmarks/where.py:150);main (benchmarks/where.py:131);"
            "main.<locals>.step_loop (benchmarks/where.py:118);")
    run = (loop + "TorchRunner.train_step (benchmarks/harness.py:160);"
           "_Batched.__call__ (dynbatch/api.py:92);run_batched (dynbatch/api.py:145);"
           "Run.finish (dynbatch/session.py:300);Run._execute (dynbatch/session.py:170);")
    execute = run + "execute (dynbatch/execute.py:43);"
    example = ("Run.trace_examples.<locals>.trace_one (dynbatch/session.py:250);"
               "_tree_loss (benchmarks/tasks.py:127);"
               "BinaryTreeLSTM.forward (dynbatch/models/tree_lstm.py:80);")
    samples = {
        loop + "Tensor.backward (torch/_tensor.py:625);_engine_run_backward "
               "(torch/autograd/graph.py:979)": "backward",
        loop + "Adam.step (torch/optim/adam.py:238)": "optimizer",
        example + "BinaryTreeLSTM._encode (dynbatch/models/tree_lstm.py:60)":
            "dynbatch: trace, model code",
        example + "block_call (dynbatch/blocks.py:147);record (<dynbatch call site>:3)":
            "dynbatch: trace, recording",
        example + "hot (dynbatch/intercept.py:150);Tracer.record (dynbatch/trace.py:99)":
            "dynbatch: trace, recording",
        run + "schedule (dynbatch/schedule.py:40);agenda_schedule (dynbatch/schedule.py:80)":
            "dynbatch: schedule",
        run + "build (dynbatch/plan.py:90);index_tensor (dynbatch/plan.py:70)": "dynbatch: plan",
        execute + "gather_inputs (dynbatch/gather.py:42);gather (dynbatch/gather.py:23)":
            "dynbatch: execute, gathering inputs (torch)",
        execute + "gather_inputs (dynbatch/gather.py:41)": "dynbatch: execute bookkeeping",
        execute + "replay (<dynbatch block BinaryTreeLSTM.node>:8);"
                  "Linear.forward (torch/nn/modules/linear.py:134)": "batched torch work",
        execute + "replay (<dynbatch block X>:3)": "batched torch work",
        execute + "PositionalCall.__call__ (dynbatch/rules/normalize.py:75)":
            "batched torch work",
        execute + "PositionalCall.__call__ (dynbatch/rules/normalize.py:74)":
            "dynbatch: execute bookkeeping",
        run + "Run.close (dynbatch/session.py:116)":
            "dynbatch: run set-up, switching examples, results, close",
        loop + "TorchRunner.train_step (benchmarks/harness.py:160);"
               "handbatched_binary_treelstm_loss (benchmarks/handbatched.py:80)":
            "forward (not dynbatch)",
        "<module> (benchmarks/where.py:123);import_module (importlib/__init__.py:126)": None,
        "": None,
    }
    for stack, expected in samples.items():
        assert where.category(stack, read_line) == expected, stack
    assert set(samples.values()) - {None} == set(where.CATEGORIES)
    for text, calls in (("n = len(a) + max(b, c)", False), ("d.get(k).append(x)", False),
                        ("if (a and b):", False), ("out = src.index_select(0, rows)", True),
                        ("return fn(*args)", True), ("parts = v.split(3)", True),
                        ("x = torch.cat(xs)", True), ("store[k] = None", False)):
        assert where.calls_out(text) is calls, text
    counts, total = where.shares([f"{stack} 3" for stack in samples] + ["", "garbage"],
                                 read_line)
    assert total == 3 * (len(samples) - 2)
    assert counts["batched torch work"] == 9 and counts["backward"] == 3


def test_tagger_lstm_implementations_agree(tiny_sst: Path):
    """The nn.LSTM tagger task (cheaper than a bench run: in this process, one minibatch):
    hand-batched and dynbatch give eager's losses, outputs and gradients; the peers and
    the blocks form do not run it."""
    from benchmarks import harness as H
    from benchmarks import tasks as T
    task = T.load_task("tagger-lstm", limit=12, sst_dir=tiny_sst, tiny=True)
    model = T.make_model(task)
    batch = task.examples[:8]
    assert len({len(w) for w, _ in batch}) > 2

    def run(name):
        impl = T.torch_impl("tagger-lstm", name)
        model.zero_grad(set_to_none=True)
        losses = impl.losses(model, batch)
        losses.sum().backward()
        with torch.no_grad():
            out = impl.infer(model, batch)
        return losses.detach(), out, [p.grad.clone() for p in model.parameters()]
    eager = run("eager")
    for name in ("hand", "dynbatch-agenda", "dynbatch-depth"):
        got = run(name)
        for a, b in zip(got[:2] + tuple(got[2]), eager[:2] + tuple(eager[2])):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        if name.startswith("dynbatch"):     # inference: embedding, nn.LSTM, linear
            assert db.stats().batches == 3, db.stats().table()
    assert eager[1].shape[0] == sum(len(w) for w, _ in batch)
    assert T.torch_impl("tagger-lstm", "dynbatch-blocks-agenda") is None
    assert H.unavailable("tagger-lstm", "dynet") and H.unavailable("tagger-lstm", "torchfold")
