"""Every family has its parts and is registered where docs/architecture.md says ("The pattern every
family follows"). Reads the source tree: the tests' parent folder, or HOTOPS_SOURCE_ROOT where
CI runs a copy of tests/ against the installed wheel."""

from __future__ import annotations

import ast
import os
import pathlib

import pytest

from hotops.bench import FAMILIES

ROOT = pathlib.Path(os.environ.get("HOTOPS_SOURCE_ROOT", pathlib.Path(__file__).resolve().parents[1]))
if not (ROOT / "csrc" / "bindings.cpp").exists():
    pytest.skip(f"no hotops source tree at {ROOT} (set HOTOPS_SOURCE_ROOT)", allow_module_level=True)

PARTS = [
    "csrc/{f}/cpu.h",
    "csrc/{f}/cpu.cpp",
    "csrc/{f}/check.cpp",
    "csrc/{f}/bind.cpp",
    "python/hotops/{f}/__init__.py",
    "python/hotops/{f}/op.py",
    "python/hotops/{f}/reference.py",
    "python/hotops/{f}/triton.py",
    "python/hotops/bench/{f}.py",
    "benchmarks/test_{f}.py",
    "tests/test_{f}.py",
    "docs/{f}.md",
]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_has_its_parts(family):
    missing = [p.format(f=family) for p in PARTS if not (ROOT / p.format(f=family)).exists()]
    assert not missing, f"family {family} lacks {missing}"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_is_registered(family):
    bindings = (ROOT / "csrc/bindings.cpp").read_text()
    assert f"void bind_{family}(py::module_& m);" in bindings and f"bind_{family}(m);" in bindings
    assert f"| {family} |" in (ROOT / "docs/architecture.md").read_text(), "architecture.md's family table"
    assert f"| `{family}` |" in (ROOT / "README.md").read_text(), "the README's family table"
    assert FAMILIES[family] == f"hotops.bench.{family}"


def _imports(path: pathlib.Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []


# the data a kernel and its reference both read (formats, the sampled key subsets): the reference
# may import these, never the code it checks
SHARED_INPUT_MODULES = {"hotops.sparse.format", "hotops.attention.sampling"}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_reference_imports_no_code_it_checks(family):
    """reference.py is what the kernels are tested against: it imports none of its family's
    modules but the input formats, so a bug in the code under test cannot hide in the reference."""
    for module, names in _imports(ROOT / "python/hotops" / family / "reference.py"):
        used = [f"{module}.{n}" for n in names] if module == f"hotops.{family}" else [module]
        for m in used:
            if m.startswith(f"hotops.{family}"):
                assert m in SHARED_INPUT_MODULES, f"{family}/reference.py imports {m}"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_production_code_never_imports_a_reference(family):
    """No module of the package (benchmarks aside: they may check their results) imports a
    family's reference.py: what is tested must not share code with what it is tested against."""
    ref = f"hotops.{family}.reference"
    users = []
    for path in sorted((ROOT / "python/hotops").rglob("*.py")):
        rel = path.relative_to(ROOT / "python/hotops")
        if rel.parts[0] == "bench" or path.name == "reference.py":
            continue
        for module, names in _imports(path):
            if module == ref or (module == f"hotops.{family}" and "reference" in names):
                users.append(str(rel))
    assert not users, f"production code imports {ref}: {users}"
