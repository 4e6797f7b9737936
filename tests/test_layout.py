"""The layout's rules, read from the source: imports flow one way (kernels -> nn / decoding -> models -> training /
data / sweeps / plotting / interop -> experiments), `seqjax.decoding` knows no model, and no module imports another
module's underscore names or an underscore module of another package. An old import path kept as a one-line alias
(a module that only re-exports its new home) is the one exception to the direction."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
RANKS = {
    "seqjax.errors": 0,
    "seqjax.runtime": 0,
    "seqjax.kernels": 1,
    "seqjax.nn": 2,
    "seqjax.decoding": 2,
    "seqjax.models": 3,
    "seqjax.training": 4,
    "seqjax.data": 4,
    "seqjax.sweeps": 4,
    "seqjax.plotting": 4,
    "seqjax.interop": 4,
    "experiments": 5,
}


def _unit(module: str) -> str:
    """The layer unit of a dotted module name: `seqjax.<package or module>` or `experiments`."""
    parts = module.split(".")
    return "experiments" if parts[0] == "experiments" else ".".join(parts[:2])


def _imports(path: pathlib.Path) -> list[tuple[str, list[str], int]]:
    """(module, imported names, line) of every absolute import of seqjax / experiments in the file, nested ones too;
    `from seqjax import kernels` is read as the module `seqjax.kernels`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module in ("seqjax", "experiments"):
                found += [(f"{node.module}.{a.name}", [], node.lineno) for a in node.names]
            else:
                found.append((node.module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names]
    return [f for f in found if f[0].split(".")[0] in ("seqjax", "experiments")]


def _is_alias(path: pathlib.Path) -> bool:
    """A module whose body is a docstring and `from NEW_HOME import *` only."""
    body = ast.parse(path.read_text()).body
    body = [n for n in body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
    return len(body) == 1 and isinstance(body[0], ast.ImportFrom) and body[0].names[0].name == "*"


def _modules():
    for top in ("seqjax", "experiments"):
        for path in sorted((ROOT / top).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            yield name, path


def test_every_unit_has_a_rank():
    assert {_unit(name) for name, _ in _modules()} - {"seqjax.__init__", "seqjax"} <= set(RANKS)


def test_imports_flow_one_way():
    upward = []
    for name, path in _modules():
        if _unit(name) not in RANKS or _is_alias(path):
            continue
        for module, _, line in _imports(path):
            if _unit(module) in RANKS and RANKS[_unit(module)] > RANKS[_unit(name)]:
                upward.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not upward, "\n".join(upward)


def test_no_cycles_between_units():
    """Units of one rank may use each other in one direction only (e.g. sweeps -> training, never back)."""
    edges = {(_unit(n), _unit(m)) for n, p in _modules() if not _is_alias(p) for m, _, _ in _imports(p)}
    both = sorted((a, b) for a, b in edges if a < b and (b, a) in edges)
    assert not both, both


def test_no_private_names_across_modules():
    crossing = []
    for name, path in _modules():
        for module, names, line in _imports(path):
            private_module = any(part.startswith("_") and part != "__init__" for part in module.split("."))
            private_names = [n for n in names if n.startswith("_")]
            if (private_module or private_names) and module != name:
                crossing.append(f"{path.relative_to(ROOT)}:{line} imports {module} {private_names or ''}")
    assert not crossing, "\n".join(crossing)


@pytest.mark.parametrize("source", ["from seqjax.models import DecoderLM\n", "from seqjax import models\n"])
def test_the_rules_see_a_planted_violation(tmp_path, source):
    """The reader finds an upward import in a planted file (so the tests above can fail)."""
    planted = tmp_path / "planted.py"
    planted.write_text('"""A nn module that imports a model."""\n' + source)
    (module, _, _), *_ = _imports(planted)
    assert RANKS[_unit(module)] > RANKS["seqjax.nn"] and not _is_alias(planted)
