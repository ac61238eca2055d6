"""Issue 5: per-example code that reads values mid-run (``x.item()``, ``bool(x)``, ``int(x)``,
``float(x)``, ``x.tolist()``, ``db.force(x)``) and still batches.

Under ``@db.batched`` every example runs in its own greenlet; a read suspends it until every
example has reached a read or its end, then the pending work those reads need executes
batched and they all resume. These tests hold that mechanism to the eager per-example code
(values and parameter gradients, float64, atol 1e-8: conftest's autouse ``float64``
fixture), to the batching bound (batched calls grow with the number of reads T, not with
examples x reads), and to a clean failure (the exception of one example propagates as
raised; the others are unwound; no greenlet, run, torch-function mode or grad mode is left
behind; the next run works; no deadlock). The reference models of the issue's examples
(GRU greedy decoder, shift-reduce parser) are checked the same way at the end.
"""
from __future__ import annotations

import gc
import threading
import traceback

import pytest
import torch
from torch import nn

import dynbatch as db
import dynbatch.session
from dynbatch.lazy import current
from dynbatch.testing import assert_close, assert_matches_eager

greenlet = pytest.importorskip("greenlet")

ATOL, RTOL = 1e-8, 1e-6
H = 5
STRATEGIES = ["agenda", "depth"]


def close(actual, expected, where="result"):
    assert_close(actual, expected, atol=ATOL, rtol=RTOL, where=where)


def vectors(n, size=H, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(size, generator=g, dtype=torch.float64) for _ in range(n)]


def params_of(*modules):
    return [p for m in modules for p in m.parameters()]


def grads_of(params, outputs):
    """Gradients of the sum of every floating output w.r.t. ``params`` (None where unused)."""
    for p in params:
        p.grad = None
    total = sum(t.sum() for t in _tensors(outputs) if t.requires_grad)
    if isinstance(total, torch.Tensor):
        total.backward()
    return [None if p.grad is None else p.grad.clone() for p in params]


def _tensors(structure):
    if isinstance(structure, torch.Tensor):
        yield structure
    elif isinstance(structure, (list, tuple)):
        for x in structure:
            yield from _tensors(x)


def live_greenlets():
    """Greenlets that are started and not finished, other than the threads' main ones."""
    gc.collect()
    return [o for o in gc.get_objects()
            if type(o) is greenlet.greenlet and o.parent is not None and not o.dead]


@pytest.fixture(autouse=True)
def restore_grad_mode():
    """A failing (or xfailing) test must not leave grad mode off for the next ones."""
    yield
    torch._C._set_grad_enabled(True)


def assert_clean_state():
    assert current.tracer is None, "a run is still current"
    assert torch._C._len_torch_function_stack() == 0, "a torch-function mode is left pushed"
    assert torch.is_grad_enabled(), "grad mode left disabled"
    assert nn.Module.__call__ is db.blocks._original_call, "nn.Module.__call__ left patched"
    assert live_greenlets() == [], "a suspended example's greenlet is still alive"


def grab_run(runs):
    """Inside per-example code: remember the current run (to read ``run.rounds``)."""
    run = current.tracer
    if run is not None and (not runs or runs[-1] is not run):
        runs.append(run)


# -- per-example programs with data-dependent control flow -----------------------------------

V, EOS = 6, 5      # a small vocabulary so that random weights hit EOS at different steps


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, H)
        self.cell = nn.GRUCell(H, H)
        self.out = nn.Linear(H, V)


def make_decoder(seed=2):
    """Weights large enough that greedy decoding varies: examples stop at EOS at different
    steps (seed 2: lengths 1 to 7) or run to their limit."""
    torch.manual_seed(seed)
    dec = Decoder()
    with torch.no_grad():
        dec.out.weight.normal_(0, 1.5)
        dec.cell.weight_hh.normal_(0, 0.8)
        dec.cell.weight_ih.normal_(0, 0.8)
    return dec


def greedy(ex, dec):
    """Decode from an example-specific state until EOS or the example's own length limit:
    ``int(logits.argmax())`` picks the next token."""
    h0, max_len = ex
    h = torch.tanh(h0)
    tok, toks, logps = 0, [], []
    for _ in range(max_len):
        h = dec.cell(dec.emb(torch.tensor(tok)), h)
        logits = dec.out(h)
        tok = int(logits.argmax())
        logps.append(torch.log_softmax(logits, 0)[tok])
        toks.append(tok)
        if tok == EOS:
            break
    return torch.stack(logps).sum(), torch.tensor(toks)


def branchy(x, lin):
    """A while loop on ``bool``, a branch on ``.item()``, an action chosen with ``.tolist()``
    and a ``float()`` read: examples take different numbers of steps and branches."""
    h, steps, total, taken = x, 0, torch.zeros(()), [0, 0]
    while bool(h[steps % H] > -0.8) and steps < 5:
        s = lin(h) + x
        if s[0].item() > 0:
            h = torch.tanh(s)
            taken[0] += 1
        else:
            h = torch.sigmoid(s) - 0.5
            taken[1] += 1
        total = total + h.sum()
        steps += 1
    vals = h.tolist()
    k = max(range(len(vals)), key=vals.__getitem__)      # the action: the best coordinate
    return total + h[k] * float(h.detach().sum() * 0 + steps), torch.tensor([steps, k] + taken)


def recursive(tree, lin_a, lin_b):
    """Reads at different depths of a Python recursion: each node picks its composition
    cell from the sign of its children's sum."""
    if not isinstance(tree, tuple):     # a leaf vector (a LazyTensor under dynbatch)
        return torch.tanh(tree)
    left, right = (recursive(t, lin_a, lin_b) for t in tree)
    both = torch.cat([left, right])
    cell = lin_a if both.sum().item() > 0 else lin_b
    return torch.tanh(cell(both))


def trees(n, seed=0):
    g = torch.Generator().manual_seed(seed)

    def build(depth):
        if depth == 0 or torch.rand((), generator=g) < 0.3:
            return torch.randn(H, generator=g)
        return (build(depth - 1), build(depth - 1))
    return [(build(3), build(3)) for _ in range(n)]


# -- values and gradients equal eager ------------------------------------------------------

@pytest.mark.parametrize("strategy", STRATEGIES)
def test_greedy_decoding_matches_eager(strategy):
    dec = make_decoder()
    examples = [(h, 2 + i % 6) for i, h in enumerate(vectors(12, scale=2.0))]
    outs = assert_matches_eager(greedy, examples, dec, atol=ATOL, rtol=RTOL,
                                strategy=strategy)
    lengths = [len(toks) for _, toks in outs]
    ended = [int(toks[-1]) == EOS for _, toks in outs]
    assert len(set(lengths)) >= 3, f"examples should stop at different steps: {lengths}"
    assert any(ended) and not all(ended), "some examples should stop at EOS, some at max_len"
    assert_clean_state()


def test_without_greenlet_reads_stay_exact_and_say_they_run_serially(monkeypatch):
    # greenlet is a declared dependency; an install without it (a bare GPU image, say)
    # must still give eager's values, and warn instead of being silently slow.
    monkeypatch.setattr(db.session, "greenlet", None)
    monkeypatch.setattr(dynbatch.session, "_warned_serial_reads", [False])
    dec = make_decoder()
    examples = [(h, 2 + i % 6) for i, h in enumerate(vectors(6, scale=2.0))]
    with pytest.warns(RuntimeWarning, match="greenlet is not installed") as caught:
        assert_matches_eager(greedy, examples, dec, atol=ATOL, rtol=RTOL)
    assert caught[0].filename == __file__, "the warning names the user's line that read"
    assert db.stats().rounds == 0
    assert_clean_state()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_branches_and_steps_match_eager(strategy):
    torch.manual_seed(1)
    lin = nn.Linear(H, H)
    xs = vectors(16, seed=3, scale=1.5)
    outs = assert_matches_eager(branchy, xs, lin, atol=ATOL, rtol=RTOL, strategy=strategy)
    steps = {int(o[1][0]) for o in outs}
    actions = {int(o[1][1]) for o in outs}
    assert len(steps) >= 4 and len(actions) >= 3, (steps, actions)
    assert sum(int(o[1][2]) for o in outs) > 0 and sum(int(o[1][3]) for o in outs) > 0, \
        "both branches should be taken"
    assert_clean_state()


def test_reads_in_recursion_match_eager():
    torch.manual_seed(2)
    lin_a, lin_b = nn.Linear(2 * H, H), nn.Linear(2 * H, H)
    examples = trees(10)
    assert_matches_eager(recursive, examples, lin_a, lin_b, atol=ATOL, rtol=RTOL)
    used = []                            # which cells each example's eager code picked
    for ex in examples:
        grads = grads_of([lin_a.weight, lin_b.weight], [recursive(ex, lin_a, lin_b)])
        used.append(tuple(g is not None for g in grads))
    assert len(set(used)) >= 2, f"every example picked the same cells: {used}"
    assert_clean_state()


def test_db_force_and_every_read_kind():
    torch.manual_seed(3)
    lin = nn.Linear(H, H)

    def fn(x, lin):
        y = torch.tanh(lin(x))
        forced = db.force(y)                     # a real tensor, detached from nothing
        assert type(forced) is torch.Tensor
        n = int(y.argmax())
        f = float(y.detach().max())
        b = bool(y.min() < 0)
        i = y.sum().item()
        lst = y.tolist()
        assert isinstance(n, int) and isinstance(f, float) and isinstance(b, bool)
        assert isinstance(i, float) and isinstance(lst, list) and len(lst) == H
        assert lst[n] == f
        return y * (n + f + b + i + sum(lst)) + forced

    xs = vectors(9, seed=4)
    runs = []

    def tracked(x, lin):
        grab_run(runs)
        return fn(x, lin)
    assert_matches_eager(tracked, xs, lin, atol=ATOL, rtol=RTOL)
    # six reads, all examples in step; the last (y.tolist()) finds y already computed by
    # db.force(y) and does not suspend: five rounds
    assert runs[-1].rounds == 5
    assert_clean_state()


def test_examples_that_never_read_mix_with_ones_that_do():
    torch.manual_seed(4)
    lin = nn.Linear(H, H)

    def fn(ex, lin):
        i, x = ex
        y = lin(x)
        for _ in range(i % 3):                   # 0, 1 or 2 reads
            if y.sum().item() > 0:
                y = torch.tanh(lin(y))
            else:
                y = lin(y) * 0.5
        return y

    examples = list(enumerate(vectors(10, seed=5)))
    assert_matches_eager(fn, examples, lin, atol=ATOL, rtol=RTOL)
    assert_clean_state()


# -- batching: batched calls grow with the number of reads, not with examples x reads -------

def stepper(ex, lin):
    """Example ``i`` makes ``steps`` reads; each step is a Linear, a tanh, a sum, one read."""
    x, steps = ex
    h = x
    for _ in range(steps):
        h = torch.tanh(lin(h))
        if h.sum().item() > 10.0:                 # never true: a read, not a branch
            h = h * 2
    return h


def batches_for(b, t, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(H, H)
    examples = [(x, 1 + i % t) for i, x in enumerate(vectors(b, seed=seed))]
    runs = []

    def fn(ex, lin):
        grab_run(runs)
        return stepper(ex, lin)
    outs = db.batched(fn)(examples, lin)
    close(outs, [stepper(ex, lin) for ex in examples])
    return db.stats().batches, runs[-1].rounds


@pytest.mark.parametrize("t", [2, 4, 8])
def test_batches_grow_with_reads_not_examples(t):
    ops_per_step = 3                              # Linear, tanh, sum
    b32, rounds32 = batches_for(32, t)
    b64, rounds64 = batches_for(64, t)
    assert rounds32 == rounds64 == t
    # per step: its ops in one batch each, plus the per-example constants once
    bound = ops_per_step * t + 2
    assert b32 <= bound and b64 <= bound, (b32, b64, bound)
    assert b64 <= b32 + 1, f"doubling the examples added batches: {b32} -> {b64}"
    assert b32 < 32 * t / 4, "no better than one batch per example and read"


def test_suspension_really_batches_argmax_reads():
    # 16 examples, each reading int(x.argmax()) 5 times: about 5 x ops-per-step batches,
    # not 16 x 5 x ops-per-step.
    dec = make_decoder()
    runs = []

    def fn(h0, dec):
        grab_run(runs)
        h, tok, toks = h0, 0, []
        for _ in range(5):
            h = dec.cell(dec.emb(torch.tensor(tok)), h)   # immediate, Embedding, GRUCell
            tok = int(dec.out(h).argmax())                 # Linear, argmax, read
            toks.append(tok)
        return h, torch.tensor(toks)

    xs = vectors(16, seed=6)
    outs = db.batched(fn)(xs, dec)
    stats = db.stats()
    close(outs, [fn(x, dec) for x in xs])
    ops_per_step = 4          # Embedding, GRUCell, Linear, argmax (the constant: immediate)
    assert runs[-1].rounds == 5
    assert stats.batches <= 5 * ops_per_step + 2, str(stats)
    assert stats.batches < 16 * 5, str(stats)
    assert stats.nodes >= 16 * 5 * ops_per_step


def test_rounds_follow_the_longest_example():
    # Rounds = the most reads any example makes, however they are spread.
    torch.manual_seed(6)
    lin = nn.Linear(H, H)
    runs = []

    def fn(ex, lin):
        grab_run(runs)
        return stepper(ex, lin)
    examples = [(x, 1 if i else 7) for i, x in enumerate(vectors(20, seed=7))]
    db.batched(fn)(examples, lin)
    assert runs[-1].rounds == 7
    assert db.stats().batches <= 3 * 7 + 2


# -- an exception in one suspended example -----------------------------------------------------

RAISE_LINE = None


def failing(ex, lin, unwound):
    i, x = ex
    h = x
    try:
        for k in range(4):
            h = torch.tanh(lin(h))
            h.sum().item()                                  # a read: suspends
            if i == 3 and k == 1:
                raise ValueError(f"examples[{i}] is bad after read {k + 1}")  # RAISE_LINE
        return h
    finally:
        unwound.append(i)


RAISE_LINE = next(n for n, line in enumerate(open(__file__), 1) if line.rstrip().endswith(
    "# RAISE_LINE") and "raise ValueError" in line)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_exception_in_a_suspended_example_propagates_and_cleans_up(strategy):
    torch.manual_seed(7)
    lin = nn.Linear(H, H)
    db.batched(stepper)([(x, 2) for x in vectors(3)], lin)
    before = db.stats()
    unwound = []
    examples = list(enumerate(vectors(8, seed=8)))
    with pytest.raises(ValueError, match=r"examples\[3\] is bad after read 2") as info:
        db.batched(failing, strategy=strategy)(examples, lin, unwound)
    err = info.value
    assert type(err) is ValueError
    frames = traceback.extract_tb(err.__traceback__)
    assert any(f.filename == __file__ and f.lineno == RAISE_LINE for f in frames), \
        "the user's raising line is not in the traceback"
    assert any("examples[3]" in note for note in getattr(err, "__notes__", []))
    # every example that had started was unwound (its finally ran), the failing one first
    assert unwound[0] == 3 and sorted(unwound) == list(range(8)), unwound
    assert db.stats() is before, "a failed run must not replace the last run's stats"
    assert_clean_state()
    # the next run works, batched and equal to eager
    outs = assert_matches_eager(stepper, [(x, 3) for x in vectors(6)], lin, atol=ATOL,
                                rtol=RTOL, strategy=strategy)
    assert len(outs) == 6
    assert_clean_state()


def test_exception_before_any_read_and_in_the_last_example():
    lin = nn.Linear(H, H)

    def first_raises(ex, lin):
        i, x = ex
        if i == 0:
            raise KeyError("early")
        return stepper((x, 3), lin)

    def last_raises(ex, lin):
        i, x = ex
        h = stepper((x, 1 + i), lin)          # the last example reads the most
        if i == 5:
            raise RuntimeError("late")
        return h

    examples = list(enumerate(vectors(6)))
    with pytest.raises(KeyError, match="early"):
        db.batched(first_raises)(examples, lin)
    assert_clean_state()
    with pytest.raises(RuntimeError, match="late"):
        db.batched(last_raises)(examples, lin)
    assert_clean_state()


def test_dynbatch_error_after_a_read_names_the_example():
    lin = nn.Linear(H, H)

    def fn(ex, lin):
        i, x = ex
        h = lin(x)
        if h.sum().item() > -100 and i == 2:
            h = torch.cat([h, torch.zeros(2, 2)])          # a shape error, example 2 only
        return h

    with pytest.raises(db.errors.DynbatchError, match=r"examples\[2\]"):
        db.batched(fn)(list(enumerate(vectors(5))), lin)
    assert_clean_state()


# -- no deadlock: a bounded wait -----------------------------------------------------------

def _in_thread(target, timeout=30.0):
    box = {}

    def body():
        try:
            box["result"] = target()
        except BaseException as err:        # noqa: BLE001 - handed to the test thread
            box["error"] = err
    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    thread.join(timeout=timeout)
    assert not thread.is_alive(), f"the batched call did not finish within {timeout} s"
    return box


def test_no_deadlock_bounded_wait():
    dec = make_decoder()
    examples = [(h, 1 + i % 7) for i, h in enumerate(vectors(24, scale=2.0))]
    box = _in_thread(lambda: db.batched(greedy)(examples, dec))
    assert "error" not in box, box.get("error")
    close(box["result"], [greedy(ex, dec) for ex in examples])
    unwound = []
    box = _in_thread(lambda: db.batched(failing)(list(enumerate(vectors(6))),
                                               nn.Linear(H, H), unwound))
    assert isinstance(box.get("error"), ValueError)
    assert sorted(unwound) == list(range(6))
    assert_clean_state()


# -- reads outside a run, and in the scope form ----------------------------------------------

def test_reads_outside_any_run_are_plain_pytorch():
    x = torch.tensor([0.5, -2.0, 3.25])
    assert current.tracer is None
    assert x.sum().item() == 1.75 and float(x[0]) == 0.5 and int(x.argmax()) == 2
    assert bool(x[2] > 3) is True and x.tolist() == [0.5, -2.0, 3.25]
    assert db.force(x) is x and db.force([x, 1]) == [x, 1]
    # ...also inside a greenlet of the user's own, with no run
    seen = []
    g = greenlet.greenlet(lambda: seen.append((x.max().item(), int(x.argmin()))))
    g.switch()
    assert seen == [(3.25, 1)] and g.dead
    assert_clean_state()


def test_reads_of_shared_tensors_inside_a_run():
    lin = nn.Linear(H, H)

    def fn(x, lin):
        scale = lin.weight.abs().sum().item()      # a shared tensor's value, exact
        assert scale == lin.weight.detach().abs().sum().item()
        return lin(x) * scale

    assert_matches_eager(fn, vectors(4), lin, atol=ATOL, rtol=RTOL)


def test_reads_in_the_autobatch_scope_are_exact_and_batched():
    torch.manual_seed(9)
    lin = nn.Linear(H, H)
    xs = vectors(20, seed=9)
    with db.autobatch() as run:
        ys = [torch.tanh(lin(x)) for x in xs]
        sums = [y.sum() for y in ys]
        tops = [y.argmax() for y in ys]
        first = sums[0].item()             # executes everything pending, batched
        sums = [s.item() for s in sums]     # no more work: the values are there
        tops = [int(t) for t in tops]
        lists = [y.tolist() for y in ys]
        flags = [bool(y.sum() > 0) for y in ys]      # reads at once, one example at a time
        picked = [y[t] * 2 for y, t in zip(ys, tops)]
    assert run.rounds == 0, "the scope form runs reads at once (no suspension)"
    assert first == sums[0]
    eager = [torch.tanh(lin(x)) for x in xs]
    for i, e in enumerate(eager):
        assert abs(sums[i] - e.sum().item()) <= ATOL
        assert tops[i] == int(e.argmax())
        assert lists[i] == pytest.approx(e.tolist(), abs=ATOL)
        assert flags[i] == bool(e.sum() > 0)
        close(picked[i].value, e[tops[i]] * 2)
    # 4 batches for the first read (lin(x) on a plain x is a constant; tanh, sum, argmax),
    # 2 per bool(...) read (they run at once, one example each), and the picks at the end
    # (y[t]: one signature per distinct t, then one mul)
    assert db.stats().batches <= 4 + 2 * len(xs) + H + 1, str(db.stats())
    assert_clean_state()


def test_autobatch_read_executes_every_pending_example_in_one_set_of_batches():
    torch.manual_seed(13)
    lin = nn.Linear(H, H)
    for n in (8, 32):
        xs = vectors(n, seed=n)
        with db.autobatch():
            # torch.tensor(...) inside the scope: per-example data, so lin(...) is recorded
            ys = [torch.tanh(lin(torch.tensor(x.tolist()))).sum() for x in xs]
            value = ys[-1].item()
            rest = [y.item() for y in ys]
        assert value == rest[-1]
        # Linear, tanh, sum (the tensors made in the scope are constants, not batches)
        assert db.stats().batches == 3, str(db.stats())
        for v, x in zip(rest, xs):
            assert abs(v - torch.tanh(lin(x)).sum().item()) <= ATOL


# -- grad mode around a read is the example's own ------------------------------------------

def test_no_grad_around_a_read_in_every_example():
    torch.manual_seed(10)
    lin = nn.Linear(H, H)

    def fn(x, lin):
        h = lin(x)
        with torch.no_grad():
            gate = 1.0 if h.sum().item() > 0 else -1.0
            frozen = lin(h)
        return torch.tanh(lin(h)) * gate + frozen

    outs = assert_matches_eager(fn, vectors(8), lin, atol=ATOL, rtol=RTOL)
    assert all(o.requires_grad for o in outs)
    assert_clean_state()


def test_outer_no_grad_around_the_batched_call():
    lin = nn.Linear(H, H)
    xs = vectors(6)
    with torch.no_grad():
        outs = db.batched(branchy)(xs, lin)
        eager = [branchy(x, lin) for x in xs]
        assert not torch.is_grad_enabled()
    assert all(not o[0].requires_grad for o in outs)
    close(outs, eager)
    assert_clean_state()


def one_frozen_reader(ex, lin):
    """Only examples[0] reads inside torch.no_grad(); the others read with grad on, and
    examples[0]'s second read is also under no_grad while the others compute."""
    i, x = ex
    h = lin(x)
    if i == 0:
        with torch.no_grad():
            v = h.sum().item()
            w = torch.tanh(lin(h)).sum().item()
    else:
        v = h.sum().item()
        w = 0.0
    return torch.tanh(lin(h)) * (v + w), lin(h).sum() * 0 + v


def test_no_grad_in_one_example_does_not_leak_into_the_others():
    torch.manual_seed(11)
    lin = nn.Linear(H, H)
    examples = list(enumerate(vectors(5)))
    outs = assert_matches_eager(one_frozen_reader, examples, lin, atol=ATOL, rtol=RTOL)
    assert all(o[0].requires_grad for o in outs)
    assert torch.is_grad_enabled()


def inference_reader(ex, lin):
    i, x = ex
    h = lin(x)
    if i == 0:
        with torch.inference_mode():
            h.sum().item()               # examples[0] suspends inside inference mode
    return lin(h).sum()


def test_inference_mode_around_a_read_is_refused_not_leaked():
    # torch keeps inference mode per thread; it cannot follow one suspended example, so a
    # read inside it in per-example code is refused with a clear error, never leaked into
    # the other examples (which would silently lose their gradients).
    from dynbatch.errors import UnsupportedError
    torch.manual_seed(14)
    lin = nn.Linear(H, H)
    examples = list(enumerate(vectors(2)))
    with pytest.raises(UnsupportedError, match="inference_mode"):
        db.batched(inference_reader)(examples, lin)
    assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()
    assert current.tracer is None


def test_whole_call_under_inference_mode_reads_fine():
    torch.manual_seed(15)
    lin = nn.Linear(H, H)
    xs = vectors(4)

    def fn(x, lin):
        h = lin(x)
        return h * 2 if h.sum().item() > 0 else h * 3
    with torch.inference_mode():
        outs = db.batched(fn)(xs, lin)
        eager = [fn(x, lin) for x in xs]
    for o, e in zip(outs, eager):
        assert_close(o, e, atol=ATOL, rtol=RTOL, where="inference")


def test_grad_mode_restored_after_a_failure_under_no_grad():
    lin = nn.Linear(H, H)

    def fn(ex, lin):
        i, x = ex
        if i < 2:
            with torch.no_grad():
                lin(x).sum().item()
        if i == 2:
            raise ValueError("boom")
        return lin(x).sum()

    with pytest.raises(ValueError, match="boom"):
        db.batched(fn)(list(enumerate(vectors(4))), lin)
    assert_clean_state()


def test_grads_through_values_chosen_by_reads():
    # The chosen branch is a Python decision; gradients flow only through what it built,
    # exactly as in eager code.
    dec = make_decoder()
    examples = [(h, 4) for h in vectors(10, scale=2.0)]
    params = params_of(dec)
    batched = db.batched(greedy)(examples, dec)
    g_batched = grads_of(params, [o[0] for o in batched])
    eager = [greedy(ex, dec) for ex in examples]
    g_eager = grads_of(params, [o[0] for o in eager])
    for k, (b, e) in enumerate(zip(g_batched, g_eager)):
        assert (b is None) == (e is None)
        if b is not None:
            close(b, e, where=f"grad {k}")


# -- the reference models of examples/greedy_decode.py and examples/shift_reduce.py ----------

def test_seq2seq_greedy_decoding_matches_eager_and_padded():
    from dynbatch.models.decoder import Seq2SeqGRU, greedy_padded
    torch.manual_seed(16)
    model = Seq2SeqGRU(vocab_size=8, embed_dim=4, hidden_dim=6, bos=6, eos=7)
    with torch.no_grad():                 # some sequences stop early, some run to max_len
        model.out.weight.normal_(0, 1.5)
        model.decoder.weight_hh.normal_(0, 1.0)
    g = torch.Generator().manual_seed(15)
    srcs = [torch.randint(0, 6, (int(n),), generator=g).tolist()
            for n in torch.randint(1, 6, (12,), generator=g)]
    runs = []

    def decode(src, model):
        grab_run(runs)
        return model.greedy(src, 6)
    eager = [model.greedy(s, 6) for s in srcs]
    assert len({len(e) for e in eager}) >= 4, eager
    assert db.batched(decode)(srcs, model) == eager
    assert greedy_padded(model, srcs, 6) == eager
    assert db.stats().batches <= 3 * 5 + 5 * 6 + 3   # encoder steps x 3 + decoder steps x 5
    # teacher-forced loss: values and gradients equal eager
    assert_matches_eager(lambda s, m: m.loss(s, s[::-1]), srcs, model, atol=ATOL, rtol=RTOL)
    assert_clean_state()


class _T:
    """A minimal binary tree: ``children`` (empty at leaves)."""

    def __init__(self, *children):
        self.children = children


def _random_tree(n, rng):
    if n == 1:
        return _T()
    k = rng.randint(1, n - 1)
    return _T(_random_tree(k, rng), _random_tree(n - k, rng))


def test_parser_transitions_and_spans():
    import random

    from dynbatch.models import parser as P
    rng = random.Random(0)
    for n in range(1, 12):
        tree = _random_tree(n, rng)
        gold = P.gold_transitions(tree)
        assert len(gold) == 2 * n - 1 and gold.count(P.SHIFT) == n
        spans = P.tree_spans(tree)
        assert len(spans) == n - 1 and (spans[-1] == (0, n) if n > 1 else spans == [])
        assert P.bracket_counts(spans, spans, n) == (max(n - 2, 0),) * 3
        assert P.bracket_counts(spans, spans, n, include_root=True) == (n - 1,) * 3
    assert P.spans_from_transitions(P.right_branching(4)) == [(2, 4), (1, 4), (0, 4)]
    assert P.spans_from_transitions(P.left_branching(4)) == [(0, 2), (0, 3), (0, 4)]
    with pytest.raises(ValueError):
        P.gold_transitions(_T(_T(), _T(), _T()))


def test_parser_batched_matches_eager():
    import random

    from dynbatch.models import parser as P
    rng = random.Random(1)
    torch.manual_seed(16)
    model = P.ShiftReduceParser(vocab_size=20, embed_dim=4, lstm_dim=4, hidden_dim=4,
                                mlp_dim=4)
    sentences = []
    for n in [1, 2, 3, 5, 8, 4, 6, 7, 3, 9]:
        ids = [rng.randrange(20) for _ in range(n)]
        sentences.append((ids, P.gold_transitions(_random_tree(n, rng))))
    # training: per-decision cross-entropy with the gold actions, values and grads
    assert_matches_eager(lambda s, m: m.loss(*s)[0], sentences, model, atol=ATOL, rtol=RTOL)
    # parsing: every decision is int(scores.argmax()), a read; same actions as eager
    runs = []

    def parse(s, m):
        grab_run(runs)
        return m.parse(s[0])
    with torch.no_grad():
        eager = [model.parse(ids) for ids, _ in sentences]
        assert db.batched(parse)(sentences, model) == eager
    for (ids, _), actions in zip(sentences, eager):
        assert len(actions) == 2 * len(ids) - 1
    most = max(sum(1 for _ in _decision_points(a)) for a in eager)
    assert runs[-1].rounds == most
    assert db.stats().batches < sum(len(a) for a in eager), str(db.stats())
    assert_clean_state()


def _decision_points(actions):
    from dynbatch.models import parser as P
    stack, left = 0, actions.count(P.SHIFT)
    for a in actions:
        if stack >= 2 and left > 0:
            yield a
        stack, left = (stack + 1, left - 1) if a == P.SHIFT else (stack - 1, left)
