"""The package's imports point one way: down the pipeline.

Every ``import`` in dynbatch is parsed, function-level ones included, and each must name a
module in a lower layer than the importing one. The layers, top to bottom, are the
pipeline a newcomer reads: the public API, the run and its lifecycle, tracing, signatures
and inference, execution of a plan, the plan, the pure schedule, the batching rules, and
the plain data and state every layer shares. Applications of the package (``models``,
``data``) may use only its public names. Private names (``_x``) stay in their module.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dynbatch"

LAYERS = [
    ["dynbatch"],                                           # public names
    ["dynbatch.testing"],
    ["dynbatch.api"],
    ["dynbatch.loader"],                                    # plans made in DataLoader workers
    ["dynbatch.ahead"],                                     # plans made, run later
    ["dynbatch.session"],                                   # a run: trace, plan, execute, reads
    ["dynbatch.refs"],                                      # plans as pickles
    ["dynbatch.wire"],                                      # plans as arrays
    ["dynbatch.blocks"],
    ["dynbatch.native"],                                    # built-in modules, natively
    ["dynbatch.trace"],
    ["dynbatch.intercept"],
    ["dynbatch.codegen"],
    ["dynbatch.signature"],                                 # keys, facts, rules chosen
    ["dynbatch.infer"],                                     # fake tensors
    ["dynbatch.execute"],
    ["dynbatch.gather"],
    ["dynbatch.plan"],
    ["dynbatch.schedule"],                                  # pure: no torch
    ["dynbatch.rules"],
    ["dynbatch.rules.losses", "dynbatch.rules.indexing", "dynbatch.rules.ragged"],
    ["dynbatch.rules.table"],
    ["dynbatch.rules.registry", "dynbatch.rules.normalize", "dynbatch.rules.fused",
     "dynbatch.rules.fallback", "dynbatch.rules.segments"],
    ["dynbatch.results"],
    ["dynbatch.graph", "dynbatch.template"],
    ["dynbatch.profile"],                                   # db.stats(): counters, table
    ["dynbatch.lazy", "dynbatch.state", "dynbatch.errors", "dynbatch.picture"],
]
LAYER = {name: k for k, names in enumerate(LAYERS) for name in names}
APPLICATIONS = ("dynbatch.models", "dynbatch.data")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names imported from it, line) for every import, at any depth."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [a.name for a in node.names]
            known = modules()
            submodules = [n for n in names if f"{target}.{n}" in known]
            # `from . import trace` imports the module dynbatch.trace, not names of dynbatch
            found += [(f"{target}.{n}", [], node.lineno) for n in submodules]
            if len(submodules) < len(names):
                found.append((target, [n for n in names if n not in submodules], node.lineno))
    return [(t, ns, line) for t, ns, line in found if t == "dynbatch" or
            t.startswith("dynbatch.")]


def engine_modules():
    return [n for n in modules() if not n.startswith(APPLICATIONS)]


def test_every_engine_module_has_a_layer():
    assert sorted(set(engine_modules()) - set(LAYER)) == []
    assert sorted(set(LAYER) - set(engine_modules())) == [], "a layer names a missing module"


@pytest.mark.parametrize("name", engine_modules())
def test_imports_point_down(name):
    path = modules()[name]
    wrong = []
    for target, names, line in imports_of(name, path):
        if target not in LAYER:
            wrong.append(f"{path.name}:{line} imports {target}, which is in no layer")
        elif target == name or LAYER[target] <= LAYER[name] and not (
                name == "dynbatch.rules" and target.startswith("dynbatch.rules.")):
            wrong.append(f"{path.name}:{line} imports {target} (layer {LAYER[target]}) "
                         f"from layer {LAYER[name]}")
    assert wrong == []


@pytest.mark.parametrize("name", engine_modules())
def test_private_names_stay_in_their_module(name):
    path = modules()[name]
    crossing = [f"{path.name}:{line} imports {n} from {target}"
                for target, names, line in imports_of(name, path)
                for n in names if n.startswith("_") and n != "__version__"]
    tree = ast.parse(path.read_text())
    engine = {m.rpartition(".")[2] for m in LAYER}
    crossing += [f"{path.name}:{node.lineno} reads {node.value.id}.{node.attr}"
                 for node in ast.walk(tree)
                 if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and
                 node.value.id in engine and node.attr.startswith("_") and
                 not node.attr.startswith("__")]
    assert crossing == []


@pytest.mark.parametrize("name", [n for n in modules() if n.startswith(APPLICATIONS)])
def test_applications_use_public_names(name):
    path = modules()[name]
    wrong = [f"{path.name}:{line} imports {target}"
             for target, _, line in imports_of(name, path)
             if target != "dynbatch" and not target.startswith(APPLICATIONS)]
    assert wrong == []


def test_the_check_sees_function_level_imports(tmp_path):
    """The parser finds an import inside a function, so a cycle cannot hide there."""
    source = tmp_path / "mod.py"
    source.write_text("def f():\n    from .session import Run\n    return Run\n")
    found = imports_of("dynbatch.graph", source)
    assert ("dynbatch.session", ["Run"], 2) in found
