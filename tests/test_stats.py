"""What ``db.stats()`` says a run did: a row per signature (how it ran, the user's line that
recorded it, nodes, batches, time), the table, and the picture of the schedule.

The model below has one call of each kind: a direct rule (tanh), a call only vmap batches
(``nn.Bilinear``: torch has no batching rule for it and warns), and one that runs one
example at a time (an ``autograd.Function`` without a vmap rule). Its results equal the
eager loop's, and each row names this file and the line of the call.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import dynbatch as db
from dynbatch import execute

_SOURCE = Path(__file__).read_text().splitlines()


def line_of(marker: str) -> int:
    hits = [i + 1 for i, text in enumerate(_SOURCE) if text.rstrip().endswith(f"# <-{marker}")]
    assert len(hits) == 1, marker
    return hits[0]


class Halve(torch.autograd.Function):
    """No vmap rule, so dynbatch runs it one example at a time."""

    @staticmethod
    def forward(ctx, x):
        ctx.scale = 0.5
        return x * ctx.scale

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.bil = nn.Bilinear(4, 4, 3)
        self.w = nn.Parameter(torch.randn(3))

    def forward(self, x):
        h = torch.tanh(x)                            # <-DIRECT
        b = self.bil(h, h)                           # <-VMAP
        return Halve.apply(b).sum() + self.w.sum()   # <-LOOP


def run_mixed(n=6):
    torch.manual_seed(0)
    model = Mixed()
    xs = [torch.randn(4) for _ in range(n)]
    execute._warned.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = db.batched(lambda x, m: m(x))(xs, model)
    for x, y in zip(xs, out):
        torch.testing.assert_close(y, model(x), atol=0, rtol=0)
    return db.stats()


def test_rows_say_how_each_signature_ran_and_where_it_was_recorded():
    s = run_mixed()
    rows = {r.name: r for r in s.rows()}
    expected = {"torch.tanh": ("rule", "DIRECT"), "torch.bilinear": ("vmap", "VMAP"),
                "Halve.apply": ("loop", "LOOP")}
    for name, (how, marker) in expected.items():
        matches = [r for n, r in rows.items() if name in n]
        assert len(matches) == 1, (name, list(rows))
        row = matches[0]
        assert row.how == how, (name, row)
        path, line = row.where.split(" in ")[0].rsplit(":", 1)
        assert Path(path).resolve() == Path(__file__).resolve(), row.where
        assert int(line) == line_of(marker), (name, row.where)
        assert row.nodes == 6 and row.batches == 1, row
    # the rows account for every batch, in the order the batches ran
    assert sum(r.batches for r in s.rows()) == s.batches == len(s.timeline)
    assert sum(n for _, n in s.timeline) == sum(r.nodes for r in s.rows())
    assert [s.rows()[k].name for k, _ in s.timeline][0] == "torch.tanh"
    assert s.batches < s.nodes          # batched: six examples, one call per signature
    assert s.reads == []


def test_table_lists_the_rows_by_time():
    s = run_mixed()
    text = s.table()
    for label, marker in (("direct rule", "DIRECT"), ("vmap", "VMAP"),
                          ("per example", "LOOP")):
        assert label in text
        assert f"test_stats.py:{line_of(marker)}" in text
    seconds = [r.seconds for r in sorted(s.rows(), key=lambda r: -r.seconds)]
    assert all(t >= 0 for t in seconds) and sum(seconds) > 0
    # sorted by time: the first row printed is the slowest
    slowest = max(s.rows(), key=lambda r: r.seconds)
    body = text.split("recorded at", 1)[1]
    assert body.strip().splitlines()[0].split()[-1] == slowest.name.split()[-1]


def test_reads_are_marked_where_the_examples_waited():
    lin = nn.Linear(3, 3)

    def fn(x, lin):
        y = lin(x)
        k = int(y.argmax())             # a read: every example waits here, then
        z = lin(y * 2)
        j = int(z.argmax())             # here
        return z[j] + y[k]

    xs = [torch.randn(3) for _ in range(5)]
    out = db.batched(fn)(xs, lin)
    for x, y in zip(xs, out):
        torch.testing.assert_close(y, fn(x, lin))
    s = db.stats()
    # the first read comes before any batch ran; the second after what the first needed
    assert s.rounds == 2 and s.reads[0] == 0 and 0 < s.reads[1] < s.batches, (s.reads, s)


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib", reason="db.stats().plot needs matplotlib")
    s = run_mixed()
    path = tmp_path / "schedule.png"
    fig = s.plot(path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert len(labels) == len(s.rows()) and any("vmap" in t for t in labels)
    import matplotlib.pyplot as plt
    plt.close(fig)


def test_plot_without_matplotlib_says_how_to_get_it(monkeypatch, tmp_path):
    s = run_mixed()
    monkeypatch.setitem(sys.modules, "matplotlib", None)    # import fails as if missing
    with pytest.raises(ImportError, match="pip install matplotlib"):
        s.plot(tmp_path / "x.png")


def test_plot_of_a_run_with_no_batch_is_an_error(tmp_path):
    pytest.importorskip("matplotlib", reason="db.stats().plot needs matplotlib")
    s = db.stats().__class__()
    with pytest.raises(ValueError, match="no batch"):
        s.plot(tmp_path / "x.png")


@db.batched
def tanh_of_linear(x, lin):
    return torch.tanh(lin(x)).sum()         # <-PLANNED


@pytest.mark.parametrize("workers", [0, 1])
def test_rows_of_a_plan_made_ahead_name_the_users_line(workers):
    torch.manual_seed(0)
    lin = nn.Linear(3, 3)
    xs = [torch.randn(3) for _ in range(8)]
    loader = db.DataLoader(xs, tanh_of_linear, lin, batch_size=4, num_workers=workers)
    for batch in loader:
        out = tanh_of_linear(batch, lin)
        for x, y in zip(batch, out):
            torch.testing.assert_close(y, torch.tanh(lin(x)).sum())
    s = db.stats()
    assert s.extra.get("ahead") and s.batches == 3 and len(s.rows()) == 3, s
    for row in s.rows():
        assert row.where.split(" in ")[0].endswith(f"test_stats.py:{line_of('PLANNED')}"), row
