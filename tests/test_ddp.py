"""DistributedDataParallel over dynbatch (examples/ddp_treelstm.py), in two gloo processes.

The oracle: each rank runs its half of a global minibatch of stdlib function trees through
``DDP(model)(shard)``, a ``@db.batched`` forward, and calls backward on the mean of its
losses; after DDP's allreduce (which averages) every rank's gradient of every parameter
must equal the eager per-example loss's over the whole global minibatch, meaned over the
trees, on the same initial weights (float64), and each rank's per-tree losses the eager
ones. Both ways of feeding the model are covered: the plain call on a shard, and
``db.DataLoader`` with a ``DistributedSampler``, planned here or in a worker. Under
``ddp.no_sync()`` the gradients stay each rank's own: they differ from the global ones and
average to them, so the comparison above sees the allreduce. The example's own training
loop runs too, both ways, and gives the same losses.

The two ranks are this file run as a script (``python tests/test_ddp.py RANK PORT DIR``):
one launch serves every test (module fixture), each rank saving what it computed.
"""
from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import dynbatch as db
from dynbatch.data import pyast
from dynbatch.loader import PlannedBatch
from dynbatch.models.tree_lstm import ChildSumTreeLSTM

REPO = Path(__file__).resolve().parents[1]
WORLD, HIDDEN, CLASSES = 2, 8, 5
GLOBAL = 12         # trees per global minibatch; the data is two of them
ATOL, RTOL = 1e-10, 1e-8
LAUNCH_TIMEOUT_S = 180


def load_example():
    path = REPO / "examples" / "ddp_treelstm.py"
    spec = importlib.util.spec_from_file_location("example_ddp_treelstm", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def data(example):
    """2 * GLOBAL small function trees of the first stdlib files (the same in every
    process: the files are sorted and the labels and vocabulary built from them)."""
    corpus = pyast.load_functions(max_files=20, max_nodes=20)
    labels = [label for label, _ in pyast.top_labels(corpus.functions, CLASSES)]
    label_id = {label: i for i, label in enumerate(labels)}
    vocab = pyast.build_vocab(corpus.functions)
    trees = [example.ast_treelstm.index(f.tree, vocab, label_id[f.label])
             for f in corpus.functions if f.label in label_id][:2 * GLOBAL]
    assert len(trees) == 2 * GLOBAL
    return trees, len(vocab)


# ---------------------------------------------------------------- one rank (a script)

def _snapshot(model, losses, indices) -> dict:
    s = db.stats()
    return {"indices": list(indices), "losses": [x.detach().clone() for x in losses],
            "grads": {n: None if p.grad is None else p.grad.clone()
                      for n, p in model.named_parameters()},
            "nodes": s.nodes, "batches": s.batches, "ahead": bool(s.extra.get("ahead"))}


def _rank_main(rank: int, port: int, out: Path) -> None:
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        example = load_example()
        trees, vocab_size = data(example)
        model = example.BatchedTreeLSTM(vocab_size, HIDDEN, HIDDEN, CLASSES)
        model.load_state_dict(torch.load(out / "init.pt"))
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        results = {}

        def step(batch, indices):
            model.zero_grad(set_to_none=True)
            losses = ddp(batch)
            torch.stack(losses).mean().backward()
            return _snapshot(model, losses, indices)

        mine = example.shard(list(range(GLOBAL)), rank, WORLD)
        results["batched"] = [step(example.shard(trees[:GLOBAL], rank, WORLD), mine)]
        with ddp.no_sync():
            results["no_sync"] = [step(example.shard(trees[:GLOBAL], rank, WORLD), mine)]
        for workers in (0, 1):
            loader = example.make_loader(trees, model, GLOBAL, rank, WORLD, workers, seed=3)
            loader.batch_sampler.sampler.set_epoch(1)
            results[f"loader{workers}"] = [
                dict(step(batch, batch.indices), planned_batch=type(batch) is PlannedBatch)
                for batch in loader]
        # The example's own training loop, both ways, from the same seed: the same trees
        # per rank and step, so the same losses.
        for how in ([], ["--loader", "--workers", "0"]):
            args = example.parse_args(["--steps", "2", "--batch", "8", "--dim", "8",
                                       "--max-files", "20", "--max-nodes", "25",
                                       "--classes", str(CLASSES), "--seed", "1"] + how)
            results["train" + "".join(how)] = example.train(args, rank, WORLD)
        torch.save(results, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- the tests

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def example():
    return load_example()


@pytest.fixture(scope="module")
def setup(example, tmp_path_factory):
    """The trees, the initial weights, and what each rank computed from them."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this "
                    "build of torch")
    out = tmp_path_factory.mktemp("ddp")
    trees, vocab_size = data(example)
    torch.manual_seed(0)
    init = ChildSumTreeLSTM(vocab_size, HIDDEN, HIDDEN, CLASSES).double().state_dict()
    torch.save(init, out / "init.pt")
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    procs = [subprocess.Popen([sys.executable, __file__, str(rank), str(port), str(out)],
                              cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in range(WORLD)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=LAUNCH_TIMEOUT_S)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {rank} exited with {p.returncode}:\n{log}"
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]
    for r, log in zip(ranks, logs):
        r["log"] = log
    return trees, init, ranks


def eager(trees, init, indices):
    """The per-example oracle: ChildSumTreeLSTM.forward on each tree, one at a time; the
    losses, and every parameter's gradient of their mean."""
    model = ChildSumTreeLSTM(init["embedding.weight"].shape[0], HIDDEN, HIDDEN, CLASSES)
    model.load_state_dict(init)
    losses = [model(trees[i]) for i in indices]
    torch.stack(losses).mean().backward()
    return ([x.detach() for x in losses],
            {n: None if p.grad is None else p.grad for n, p in model.named_parameters()})


def assert_grads_equal(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), what
    for name, g in want.items():
        assert (got[name] is None) == (g is None), f"{what}: {name} grad None-ness"
        if g is not None:
            assert got[name].dtype == g.dtype == torch.float64, (what, name)
            torch.testing.assert_close(got[name], g, atol=ATOL, rtol=RTOL,
                                       msg=lambda m: f"{what}: grad of {name}: {m}")


def assert_losses_equal(step: dict, trees, init, what: str) -> None:
    want, _ = eager(trees, init, step["indices"])
    assert len(step["losses"]) == len(want), what
    for i, (got, w) in zip(step["indices"], zip(step["losses"], want)):
        assert got.dtype == w.dtype and got.shape == w.shape, (what, i)
        torch.testing.assert_close(got, w, atol=ATOL, rtol=RTOL,
                                   msg=lambda m: f"{what}: loss of tree {i}: {m}")


def assert_batched(step: dict, what: str) -> None:
    # A minibatch of 6 trees of up to 20 nodes traces ~1,000 ops: batched, the calls
    # number a few per op of a node times the height, far fewer than the nodes.
    assert step["batches"] * 4 < step["nodes"], (what, step["nodes"], step["batches"])


def test_batched_call_matches_eager(setup):
    trees, init, ranks = setup
    _, want = eager(trees, init, range(GLOBAL))
    shards = [r["batched"][0] for r in ranks]
    assert sorted(i for s in shards for i in s["indices"]) == list(range(GLOBAL))
    for rank, s in enumerate(shards):
        assert s["indices"] == list(range(rank, GLOBAL, WORLD))
        assert_grads_equal(s["grads"], want, f"rank {rank}, @db.batched through DDP")
        assert_losses_equal(s, trees, init, f"rank {rank}")
        assert_batched(s, f"rank {rank}")


def test_no_sync_keeps_each_rank_own_gradients(setup):
    trees, init, ranks = setup
    _, want = eager(trees, init, range(GLOBAL))
    local = [r["no_sync"][0] for r in ranks]
    for rank, s in enumerate(local):
        assert_grads_equal(s["grads"], eager(trees, init, s["indices"])[1],
                           f"rank {rank} under no_sync")
    # The shards' own gradients are not the global ones: so the test above, where they
    # are, sees DDP's allreduce; averaged, they are (equal shards).
    assert any(not torch.allclose(local[0]["grads"][n], want[n], atol=1e-6) for n in want)
    mean = {n: (local[0]["grads"][n] + local[1]["grads"][n]) / WORLD for n in want}
    assert_grads_equal(mean, want, "mean of the ranks' own gradients")


@pytest.mark.parametrize("workers", [0, 1])
def test_loader_with_distributed_sampler_matches_eager(setup, example, workers):
    trees, init, ranks = setup
    steps = [r[f"loader{workers}"] for r in ranks]
    assert [len(s) for s in steps] == [2, 2]    # 24 trees, 6 per rank and step
    seen = []
    for k in range(2):
        shards = [s[k] for s in steps]
        union = sorted(i for s in shards for i in s["indices"])
        assert len(union) == len(set(union)) == GLOBAL, union   # disjoint halves
        seen += union
        _, want = eager(trees, init, union)
        for rank, s in enumerate(shards):
            what = f"rank {rank}, db.DataLoader({workers} workers), step {k}"
            assert s["planned_batch"] and s["ahead"], f"{what}: the plan made ahead ran"
            assert_grads_equal(s["grads"], want, what)
            assert_losses_equal(s, trees, init, what)
            assert_batched(s, what)
    assert sorted(seen) == list(range(2 * GLOBAL))      # the epoch, each tree once
    # The example's plain path gives each rank the same trees as the sampler does.
    plain = list(example.global_batches(list(range(2 * GLOBAL)), GLOBAL, epoch=1, seed=3))
    assert [[example.shard(b, rank, WORLD) for b in plain] for rank in range(WORLD)] == \
        [[s["indices"] for s in rank_steps] for rank_steps in steps]


def test_planned_batch_survives_ddp_input_moves(example):
    """With ``device_ids`` (one GPU per rank) DDP moves its inputs with
    ``_recursive_to``: lists are rebuilt around the same trees, and a PlannedBatch, not a
    list, passes as itself with its plan. Checked here with the CPU as the target."""
    try:
        from torch.distributed.utils import _to_kwargs
    except ImportError:
        pytest.skip("torch.distributed.utils._to_kwargs is not in this torch")
    trees, vocab_size = data(example)
    torch.manual_seed(0)
    model = example.BatchedTreeLSTM(vocab_size, HIDDEN, HIDDEN, CLASSES)
    batch = next(iter(db.DataLoader(trees, model, batch_size=4)))
    (moved,), _ = _to_kwargs((batch,), {}, torch.device("cpu"), False)
    assert moved[0] is batch
    (moved_list,), _ = _to_kwargs((list(batch),), {}, torch.device("cpu"), False)
    assert all(a is b for a, b in zip(moved_list[0], batch)) and len(moved_list[0]) == 4
    losses = model(*moved)
    assert db.stats().extra.get("ahead"), "the PlannedBatch's plan ran"
    want, _ = eager(trees, model.state_dict(), batch.indices)
    torch.testing.assert_close(torch.stack(losses).detach(), torch.stack(want),
                               atol=ATOL, rtol=RTOL)


def test_example_trains_the_same_either_way(setup):
    """examples/ddp_treelstm.py's loop (``train``) on both ranks: @db.batched shards and
    db.DataLoader with a DistributedSampler see the same trees, so their losses agree."""
    _, _, ranks = setup
    plain, loader = ranks[0]["train"], ranks[0]["train--loader--workers0"]
    assert len(plain["loss"]) == 2 and all(x > 0 for x in plain["loss"]), plain
    torch.testing.assert_close(loader["loss"], plain["loss"], atol=1e-9, rtol=1e-9)
    assert ranks[1]["train"]["loss"] == plain["loss"]    # gathered from every rank
    assert "summary: 2 ranks x 1 thread(s), @db.batched, 2 steps of 8 trees" in \
        ranks[0]["log"], ranks[0]["log"]
    assert "rank 1 step 2: loss" in ranks[1]["log"] and "summary" not in ranks[1]["log"]


if __name__ == "__main__":
    _rank_main(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
