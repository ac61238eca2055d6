"""Peer libraries on the benchmark tasks: DyNet with autobatching and TorchFold.

Each is written the way that library is meant to be used, with the same model math as
dynbatch/models (gate order, biases, zero initial states, cross-entropy per node/token):

* DyNet (PyPI ``dynet38``, ``pip install -e .[dynet]``): its own ParameterCollection,
  initialised by copying the torch model's weights; the per-example code builds expressions
  for the whole minibatch in one computation graph and DyNet's on-the-fly autobatching
  (``autobatch=1``) batches them at ``forward``. Adam with torch's defaults, gradient
  clipping off and dense updates, so a step is the same update torch's Adam makes. DyNet
  from PyPI is single-threaded whatever torch's thread count.
* TorchFold (``torchfold``, ``pip install -e .[torchfold]``): the per-example code adds ops to
  a ``Fold``; ``Fold.apply`` runs them depth by depth, one call per (depth, op), on the torch
  model's own parameters (its optimizer is torch's Adam, like every PyTorch implementation).

Both are optional: ``dynet_status()`` / ``torchfold_status()`` say why one is unavailable.
"""
from __future__ import annotations

import functools
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynbatch.models import BiLSTMTagger, BinaryTreeLSTM, ChildSumTreeLSTM

# ---------------------------------------------------------------------------------------
# DyNet

_dy = None
_dy_error: str | None = None


def dynet_status() -> str | None:
    """None when DyNet imports with autobatching on, else why not (to print and skip)."""
    _dynet()
    return _dy_error


def _dynet():
    """Import DyNet once per process, autobatching on (it must be configured before import)."""
    global _dy, _dy_error
    if _dy is not None or _dy_error is not None:
        return _dy
    try:
        import dynet_config
        dynet_config.set(random_seed=1, autobatch=1)
        import dynet
    except Exception as err:  # ImportError, or a wheel that does not load on this Python
        _dy_error = (f"DyNet unavailable ({type(err).__name__}: {err}); "
                     f"install with `pip install -e .[dynet]` (PyPI dynet38)")
        return None
    _dy = dynet
    return _dy


def _np(t: Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy(), dtype=np.float32)


class DynetRunner:
    """Base: parameters copied from a torch model, Adam, one computation graph per minibatch.
    ``names`` maps each torch parameter name to (dynet parameter, how to read its gradient)."""

    name = "dynet"

    def __init__(self, model: nn.Module, lr: float) -> None:
        dy = _dynet()
        if dy is None:
            raise RuntimeError(_dy_error)
        self.dy = dy
        self.pc = dy.ParameterCollection()
        self.H = model.hidden_dim
        self.names: dict[str, Any] = {}
        self._build(model)
        self.trainer = dy.AdamTrainer(self.pc, alpha=lr, beta_1=0.9, beta_2=0.999, eps=1e-8)
        self.trainer.set_clip_threshold(0)      # torch's Adam does not clip
        self.trainer.set_sparse_updates(False)  # torch's Adam updates every embedding row

    # helpers for subclasses
    def _param(self, torch_name: str, t: Tensor):
        p = self.pc.parameters_from_numpy(_np(t))
        self.names[torch_name] = p
        return p

    def _lookup(self, torch_name: str, t: Tensor):
        p = self.pc.lookup_parameters_from_numpy(_np(t))
        self.names[torch_name] = p
        return p

    def _exprs(self) -> None:
        """A fresh graph. DyNet adds the parameters a graph uses by itself."""
        self.dy.renew_cg()
        self.e = self._params

    # the harness's interface
    def train_step(self, batch: list) -> None:
        self._exprs()
        total = self.dy.esum([self.example_loss(x) for x in batch])
        total.forward()
        total.backward()
        self.trainer.update()

    def infer(self, batch: list) -> np.ndarray:
        self._exprs()
        outs = [o for x in batch for o in self.example_outputs(x)]
        classes = outs[0].dim()[0][0]
        return self.dy.concatenate_cols(outs).npvalue().reshape(classes, len(outs)).T

    def agreement(self, batch: list) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Per-example losses, inference outputs and the gradient of their sum (no update)."""
        outputs = self.infer(batch)
        self._exprs()
        losses = [self.example_loss(x) for x in batch]
        total = self.dy.esum(losses)
        total.forward()
        values = np.array([l.value() for l in losses], dtype=np.float64)
        total.backward()
        grads = {name: self._grad(name) for name in self.names}
        return values, outputs, grads

    def _grad(self, name: str) -> np.ndarray:
        return self.names[name].grad_as_array()

    def last_stats(self) -> dict | None:
        return None


class DynetBinaryTreeLSTM(DynetRunner):
    def _build(self, m: BinaryTreeLSTM) -> None:
        self.E = self._lookup("embedding.weight", m.embedding.weight)
        self._params = {
            "Wl": self._param("leaf_gates.weight", m.leaf_gates.weight),
            "bl": self._param("leaf_gates.bias", m.leaf_gates.bias),
            "Wn": self._param("node_gates.weight", m.node_gates.weight),
            "bn": self._param("node_gates.bias", m.node_gates.bias),
            "Wc": self._param("classifier.weight", m.classifier.weight),
            "bc": self._param("classifier.bias", m.classifier.bias),
        }

    def _encode(self, tree, visited):
        dy, e, H = self.dy, self.e, self.H
        if tree.children:
            left, right = tree.children
            hl, cl = self._encode(left, visited)
            hr, cr = self._encode(right, visited)
            z = dy.affine_transform([e["bn"], e["Wn"], dy.concatenate([hl, hr])])
            c = (dy.cmult(dy.logistic(dy.pickrange(z, 0, H)), dy.tanh(dy.pickrange(z, 4 * H, 5 * H)))
                 + dy.cmult(dy.logistic(dy.pickrange(z, H, 2 * H)), cl)
                 + dy.cmult(dy.logistic(dy.pickrange(z, 2 * H, 3 * H)), cr))
            o = dy.pickrange(z, 3 * H, 4 * H)
        else:
            z = dy.affine_transform([e["bl"], e["Wl"], dy.lookup(self.E, tree.word_id)])
            c = dy.cmult(dy.logistic(dy.pickrange(z, 0, H)), dy.tanh(dy.pickrange(z, 2 * H, 3 * H)))
            o = dy.pickrange(z, H, 2 * H)
        h = dy.cmult(dy.logistic(o), dy.tanh(c))
        if visited is not None:
            visited.append((h, tree.label))
        return h, c

    def _logits(self, h):
        return self.dy.affine_transform([self.e["bc"], self.e["Wc"], h])

    def example_loss(self, tree):
        visited: list = []
        self._encode(tree, visited)
        losses = [self.dy.pickneglogsoftmax(self._logits(h), label)
                  for h, label in visited if label >= 0]
        return self.dy.esum(losses) if losses else self.dy.scalarInput(0.0)

    def example_outputs(self, tree):
        return [self._logits(self._encode(tree, None)[0])]


class DynetChildSumTreeLSTM(DynetRunner):
    def _build(self, m: ChildSumTreeLSTM) -> None:
        self.E = self._lookup("embedding.weight", m.embedding.weight)
        self._params = {
            "Wiou": self._param("w_iou.weight", m.w_iou.weight),
            "biou": self._param("w_iou.bias", m.w_iou.bias),
            "Uiou": self._param("u_iou.weight", m.u_iou.weight),
            "Wf": self._param("w_f.weight", m.w_f.weight),
            "bf": self._param("w_f.bias", m.w_f.bias),
            "Uf": self._param("u_f.weight", m.u_f.weight),
            "Wc": self._param("classifier.weight", m.classifier.weight),
            "bc": self._param("classifier.bias", m.classifier.bias),
        }

    def _encode(self, tree):
        dy, e, H = self.dy, self.e, self.H
        children = [self._encode(c) for c in tree.children]
        x = dy.lookup(self.E, tree.word_id)
        if children:
            h_sum = dy.esum([h for h, _ in children])
            iou = dy.affine_transform([e["biou"], e["Wiou"], x, e["Uiou"], h_sum])
        else:  # U h~ vanishes when h~ = 0
            iou = dy.affine_transform([e["biou"], e["Wiou"], x])
        c = dy.cmult(dy.logistic(dy.pickrange(iou, 0, H)), dy.tanh(dy.pickrange(iou, 2 * H, 3 * H)))
        if children:
            wx = dy.affine_transform([e["bf"], e["Wf"], x])
            for h_k, c_k in children:
                c = c + dy.cmult(dy.logistic(wx + e["Uf"] * h_k), c_k)
        h = dy.cmult(dy.logistic(dy.pickrange(iou, H, 2 * H)), dy.tanh(c))
        return h, c

    def _logits(self, tree):
        return self.dy.affine_transform([self.e["bc"], self.e["Wc"], self._encode(tree)[0]])

    def example_loss(self, tree):
        return self.dy.pickneglogsoftmax(self._logits(tree), tree.label)

    def example_outputs(self, tree):
        return [self._logits(tree)]


class DynetBiLSTMTagger(DynetRunner):
    def _build(self, m: BiLSTMTagger) -> None:
        self.E = self._lookup("embedding.weight", m.embedding.weight)
        self._params = {"Wo": self._param("out.weight", m.out.weight),
                        "bo": self._param("out.bias", m.out.bias)}
        for d, cell in (("fwd", m.fwd), ("bwd", m.bwd)):
            self._params[d + "_Wih"] = self._param(f"{d}.weight_ih", cell.weight_ih)
            self._params[d + "_Whh"] = self._param(f"{d}.weight_hh", cell.weight_hh)
            # One bias: b_ih + b_hh enter the gates as a sum, so both get its gradient.
            b = self.pc.parameters_from_numpy(_np(cell.bias_ih + cell.bias_hh))
            self._params[d + "_b"] = b
            self.names[f"{d}.bias_ih"] = self.names[f"{d}.bias_hh"] = b

    def _run(self, d: str, xs):
        dy, e, H = self.dy, self.e, self.H
        h = c = None
        hs = []
        for x in xs:
            if h is None:  # zero initial state: W_hh h and f * c vanish
                g = dy.affine_transform([e[d + "_b"], e[d + "_Wih"], x])
            else:
                g = dy.affine_transform([e[d + "_b"], e[d + "_Wih"], x, e[d + "_Whh"], h])
            i = dy.logistic(dy.pickrange(g, 0, H))
            u = dy.tanh(dy.pickrange(g, 2 * H, 3 * H))
            c = dy.cmult(i, u) if c is None else \
                dy.cmult(dy.logistic(dy.pickrange(g, H, 2 * H)), c) + dy.cmult(i, u)
            h = dy.cmult(dy.logistic(dy.pickrange(g, 3 * H, 4 * H)), dy.tanh(c))
            hs.append(h)
        return hs

    def _logits(self, words):
        dy, e = self.dy, self.e
        xs = [dy.lookup(self.E, w) for w in words]
        fwd = self._run("fwd", xs)
        bwd = self._run("bwd", xs[::-1])[::-1]
        return [dy.affine_transform([e["bo"], e["Wo"], dy.concatenate([f, b])])
                for f, b in zip(fwd, bwd)]

    def example_loss(self, example):
        words, tags = example
        return self.dy.esum([self.dy.pickneglogsoftmax(l, t)
                             for l, t in zip(self._logits(words), tags)])

    def example_outputs(self, example):
        return self._logits(example[0])


def dynet_runner(task: str, model: nn.Module, lr: float) -> DynetRunner:
    cls = {"sst128": DynetBinaryTreeLSTM, "sst300": DynetBinaryTreeLSTM,
           "ast": DynetChildSumTreeLSTM, "tagger": DynetBiLSTMTagger}[task]
    return cls(model, lr)


# ---------------------------------------------------------------------------------------
# TorchFold

_tf_error: str | None = None
_Fold = None


def torchfold_status() -> str | None:
    """None when TorchFold imports, else why not (to print and skip)."""
    _fold_class()
    return _tf_error


def _fold_class():
    global _Fold, _tf_error
    if _Fold is not None or _tf_error is not None:
        return _Fold
    try:
        import torchfold
    except Exception as err:
        _tf_error = (f"TorchFold unavailable ({type(err).__name__}: {err}); "
                     f"install with `pip install -e .[torchfold]`")
        return None

    class Fold(torchfold.Fold):
        """torchfold 0.1.0 on current PyTorch: its ``add`` type-checks against
        ``torch.tensor._TensorBase``, gone since PyTorch 0.4; the same method without it."""

        def add(self, op, *args):
            self.total_nodes += 1
            cached = self.cached_nodes[op]
            node = cached.get(args)
            if node is None:
                step = max([0] + [a.step + 1 for a in args if isinstance(a, torchfold.Fold.Node)])
                node = torchfold.Fold.Node(op, step, len(self.steps[step][op]), *args)
                self.steps[step][op].append(args)
                cached[args] = node
            return node

        def groups(self) -> int:
            return sum(len(ops) for ops in self.steps.values())

    _Fold = Fold
    return _Fold


def _apply(fold, module, nodes: list) -> Tensor:
    with warnings.catch_warnings():  # torchfold builds Variable(..., volatile=...): a warning
        warnings.simplefilter("ignore")
        return fold.apply(module, [nodes])[0]


class _FoldBinary(nn.Module):
    """The ops a Fold calls, batched over their first dimension, on the model's parameters."""

    def __init__(self, m: BinaryTreeLSTM) -> None:
        super().__init__()
        self.m = m

    def leaf(self, words: Tensor):
        m = self.m
        i, o, u = m.leaf_gates(m.embedding(words)).chunk(3, 1)
        c = torch.sigmoid(i) * torch.tanh(u)
        return torch.sigmoid(o) * torch.tanh(c), c

    def node(self, hl, cl, hr, cr):
        i, fl, fr, o, u = self.m.node_gates(torch.cat([hl, hr], 1)).chunk(5, 1)
        c = torch.sigmoid(i) * torch.tanh(u) + torch.sigmoid(fl) * cl + torch.sigmoid(fr) * cr
        return torch.sigmoid(o) * torch.tanh(c), c


class _FoldChildSum(nn.Module):
    """One op per number of children (``cell0``, ``cell1``, ...): a Fold batches per op."""

    def __init__(self, m: ChildSumTreeLSTM) -> None:
        super().__init__()
        self.m = m

    def __getattr__(self, name: str):
        if name.startswith("cell") and name[4:].isdigit():
            return functools.partial(self._cell, int(name[4:]))
        return super().__getattr__(name)

    def _cell(self, k: int, words: Tensor, *hc: Tensor):
        m = self.m
        x = m.embedding(words)
        iou = m.w_iou(x)
        if k:
            h_sum = torch.stack(hc[:k], 0).sum(0)
            iou = iou + m.u_iou(h_sum)
        i, o, u = iou.chunk(3, 1)
        c = torch.sigmoid(i) * torch.tanh(u)
        if k:
            wx = m.w_f(x)
            for h_k, c_k in zip(hc[:k], hc[k:]):
                c = c + torch.sigmoid(wx + m.u_f(h_k)) * c_k
        return torch.sigmoid(o) * torch.tanh(c), c


class _FoldTagger(nn.Module):
    def __init__(self, m: BiLSTMTagger) -> None:
        super().__init__()
        self.m = m

    def embed(self, words: Tensor) -> Tensor:
        return self.m.embedding(words)

    def fwd0(self, x):          # first step: LSTMCell's own zero state, as the eager code
        return self.m.fwd(x)

    def fwd(self, x, h, c):
        return self.m.fwd(x, (h, c))

    def bwd0(self, x):
        return self.m.bwd(x)

    def bwd(self, x, h, c):
        return self.m.bwd(x, (h, c))

    def out(self, f, b):
        return self.m.out(torch.cat([f, b], 1))


class TorchFoldImpl:
    """TorchFold versions of the tasks' losses and inference outputs (the harness wraps
    these like any PyTorch implementation: same model object, torch's Adam)."""

    def __init__(self, task: str) -> None:
        self.task = task
        self.fold_class = _fold_class()
        if self.fold_class is None:
            raise RuntimeError(_tf_error)
        self.groups = 0  # (depth, op) groups of the last fold: its batched calls

    # SST binary Tree-LSTM ----------------------------------------------------------
    def _sst_fold(self, trees, labelled: bool):
        f = self.fold_class()

        def enc(t, out):
            if t.children:
                left, right = t.children
                hl, cl = enc(left, out)
                hr, cr = enc(right, out)
                h, c = f.add("node", hl, cl, hr, cr).split(2)
            else:
                h, c = f.add("leaf", t.word_id).split(2)
            if out is not None and t.label >= 0:
                out.append((h, t.label))
            return h, c

        if labelled:
            per_tree = []
            for t in trees:
                out: list = []
                enc(t, out)
                per_tree.append(out)
            return f, per_tree
        return f, [enc(t, None)[0] for t in trees]

    # Child-Sum Tree-LSTM -------------------------------------------------------------
    def _childsum_roots(self, trees):
        f = self.fold_class()

        def enc(t):
            kids = [enc(c) for c in t.children]
            return f.add(f"cell{len(kids)}", t.word_id, *(h for h, _ in kids),
                         *(c for _, c in kids)).split(2)

        return f, [enc(t)[0] for t in trees]

    # BiLSTM tagger -------------------------------------------------------------------
    def _tagger_logits(self, sentences):
        f = self.fold_class()
        per_sentence = []
        for words in sentences:
            xs = [f.add("embed", w) for w in words]
            states = {}
            for d, seq in (("fwd", xs), ("bwd", xs[::-1])):
                hs, state = [], None
                for x in seq:
                    state = (f.add(d + "0", x) if state is None else f.add(d, x, *state)).split(2)
                    hs.append(state[0])
                states[d] = hs
            per_sentence.append([f.add("out", hf, hb)
                                 for hf, hb in zip(states["fwd"], states["bwd"][::-1])])
        return f, per_sentence

    def _module(self, model):
        cls = {"ast": _FoldChildSum, "tagger": _FoldTagger}.get(self.task, _FoldBinary)
        return cls(model)

    def losses(self, model: nn.Module, batch: list) -> Tensor:
        if self.task == "tagger":
            f, per = self._tagger_logits([w for w, _ in batch])
            logits = _apply(f, self._module(model), [n for s in per for n in s])
            targets = [t for _, tags in batch for t in tags]
            owner = [b for b, (w, _) in enumerate(batch) for _ in w]
        elif self.task == "ast":
            f, roots = self._childsum_roots(batch)
            logits = model.classifier(_apply(f, self._module(model), roots))
            targets, owner = [t.label for t in batch], list(range(len(batch)))
        else:
            f, per = self._sst_fold(batch, labelled=True)
            h = _apply(f, self._module(model), [h for nodes in per for h, _ in nodes])
            logits = model.logits(h)
            targets = [label for nodes in per for _, label in nodes]
            owner = [b for b, nodes in enumerate(per) for _ in nodes]
        self.groups = f.groups()
        losses = F.cross_entropy(logits, torch.tensor(targets), reduction="none")
        return losses.new_zeros(len(batch)).index_add(0, torch.tensor(owner), losses)

    def infer(self, model: nn.Module, batch: list) -> Tensor:
        if self.task == "tagger":
            f, per = self._tagger_logits([w for w, _ in batch])
            out = _apply(f, self._module(model), [n for s in per for n in s])
        elif self.task == "ast":
            f, roots = self._childsum_roots(batch)
            out = model.classifier(_apply(f, self._module(model), roots))
        else:
            f, roots = self._sst_fold(batch, labelled=False)
            out = model.logits(_apply(f, self._module(model), roots))
        self.groups = f.groups()
        return out
