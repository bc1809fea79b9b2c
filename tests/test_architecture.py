"""The package's layers only point down (docs/ARCHITECTURE.md).

Every module's imports are read with `ast` (module level and inside functions alike: a lazy import is
still a dependency) and resolved to the project's module names as installed (passes/ is
`vmeanba_compiler.passes`, lowering/ is `vmeanba_compiler.lowering`, see pyproject.toml). A module may
import its own layer and the layers below it, never one above.
"""

from __future__ import annotations

import ast
import fnmatch
from pathlib import Path
from typing import Iterator, NamedTuple, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "vmeanba_compiler"
# source folder -> package it installs as
SOURCE_DIRS = {"vmeanba_compiler": PACKAGE, "passes": f"{PACKAGE}.passes", "lowering": f"{PACKAGE}.lowering"}

# Bottom to top. A module belongs to the layer of the first pattern that matches its name.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    # the op's argument schema and the small data models the passes read: no project imports but each other
    ("schema", ("vmeanba_compiler.scan_schema", "vmeanba_compiler.rewrite_modes", "vmeanba_compiler.profile",
                "vmeanba_compiler.config")),
    # kernels: reference loop, C kernel, Triton kernels
    ("lowering", ("vmeanba_compiler.lowering", "vmeanba_compiler.lowering.*")),
    # the torch.library op registration, dispatching to lowering/
    ("op", ("vmeanba_compiler.ops", "vmeanba_compiler.reduced_op")),
    # canonicalisation (graph passes and trace-time substitutions), site discovery, selection, rewrite
    ("passes", ("vmeanba_compiler.passes", "vmeanba_compiler.passes.*", "vmeanba_compiler.polyfills",
                "vmeanba_compiler.polyfills.*", "vmeanba_compiler.scan_substitutions")),
    # the public API: backend, calibrate, explain, budget selection, evaluation; the reference models
    ("api", ("vmeanba_compiler", "vmeanba_compiler.backend", "vmeanba_compiler.inductor_cache", "vmeanba_compiler.tracing",
             "vmeanba_compiler.calibration", "vmeanba_compiler.explain", "vmeanba_compiler.budget",
             "vmeanba_compiler.evaluation", "vmeanba_compiler.rankings", "vmeanba_compiler.distributed",
             "vmeanba_compiler.pruning", "vmeanba_compiler.threads", "vmeanba_compiler.models",
             "vmeanba_compiler.models.*", "vmeanba_compiler.export")),
    # deployment: the op library's C functions, AOTInductor packages that call them, the C++ runner
    ("deploy", ("vmeanba_compiler.deploy", "vmeanba_compiler.deploy.*")),
    # what is built on the API: the CLI and its commands, the demo, benchmarks, test helpers
    ("tools", ("vmeanba_compiler.cli", "vmeanba_compiler.commands", "vmeanba_compiler.demo",
               "vmeanba_compiler.experiments", "vmeanba_compiler.training", "vmeanba_compiler.digits",
               "vmeanba_compiler.extras", "vmeanba_compiler.loading", "vmeanba_compiler.plots", "vmeanba_compiler.reporting",
               "vmeanba_compiler.soak", "vmeanba_compiler.testing", "vmeanba_compiler.bench",
               "vmeanba_compiler.bench.*")),
]
RANK = {name: rank for rank, (name, _) in enumerate(LAYERS)}


class Violation(NamedTuple):
    where: str  # file:line
    importer: str
    importer_layer: str
    imported: str
    imported_layer: str

    def __str__(self) -> str:
        return (f"{self.where}: {self.importer} ({self.importer_layer}) imports {self.imported} "
                f"({self.imported_layer}), a layer above it")


def layer_of(module: str) -> Optional[str]:
    for name, patterns in LAYERS:
        if any(fnmatch.fnmatchcase(module, p) for p in patterns):
            return name
    return None


def project_modules() -> dict[str, Path]:
    """Every module of the installed package, by dotted name -> source file."""
    modules = {}
    for folder, package in SOURCE_DIRS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


def _resolve(module: str, is_package: bool, node: ast.AST, known: set[str]) -> Iterator[str]:
    """The project modules one import statement names (others, e.g. torch, are skipped)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        assert isinstance(node, ast.ImportFrom)
        if node.level:
            package = module if is_package else module.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = ".".join(p for p in (package, node.module) if p)
        else:
            base = node.module or ""
        # `from pkg import name`: name is a submodule if there is one, else an attribute of pkg
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    resolved = []
    for name in names:
        while name and name not in known:  # `import a.b.c` of a project package: its deepest known part
            name = name.rpartition(".")[0]
        resolved.append(name)
    yield from (name for name in dict.fromkeys(resolved) if name)


def import_violations(module: str, source: str, filename: str, known: set[str],
                      is_package: bool = False) -> list[Violation]:
    """Every import in `source` (the code of `module`) that points to a higher layer."""
    own = layer_of(module)
    violations = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        for imported in _resolve(module, is_package, node, known):
            theirs = layer_of(imported)
            if own is not None and theirs is not None and RANK[theirs] > RANK[own]:
                violations.append(Violation(f"{filename}:{node.lineno}", module, own, imported, theirs))
    return violations


def all_violations() -> list[Violation]:
    modules = project_modules()
    known = set(modules)
    found = []
    for module, path in modules.items():
        found += import_violations(module, path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)), known,
                                   is_package=path.name == "__init__.py")
    return found


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in project_modules() if layer_of(m) is None)
    assert not unplaced, f"modules in no layer (add them to LAYERS and docs/ARCHITECTURE.md): {unplaced}"


def test_imports_only_point_down():
    violations = all_violations()
    assert not violations, "imports pointing up the layers:\n" + "\n".join(map(str, violations))


@pytest.mark.parametrize("module, source, imported", [
    # a kernel reaching for a pass (relative, from lowering/)
    ("vmeanba_compiler.lowering.fake_kernel", "from ..passes.reduced_scan import DT_MODES\n",
     "vmeanba_compiler.passes.reduced_scan"),
    # the config reaching for a pass, as config.py once did for DT_MODES
    ("vmeanba_compiler.config", "from .passes.reduced_scan import DT_MODES\n", "vmeanba_compiler.passes.reduced_scan"),
    # the schema importing the op module by absolute name, inside a function
    ("vmeanba_compiler.scan_schema", "def f():\n    import vmeanba_compiler.ops\n", "vmeanba_compiler.ops"),
    # a pass importing the public API through the package: `from .. import calibrate`
    ("vmeanba_compiler.passes.fake_pass", "from .. import calibrate\n", "vmeanba_compiler"),
])
def test_checker_flags_an_upward_import(module, source, imported):
    """Negative control: synthetic upward imports are reported, naming the importer and what it imports."""
    known = set(project_modules())
    violations = import_violations(module, source, "synthetic.py", known)
    assert [v.imported for v in violations] == [imported]
    assert module in str(violations[0]) and imported in str(violations[0]) and "synthetic.py:" in str(violations[0])


def test_checker_allows_downward_and_sideways_imports():
    known = set(project_modules())
    source = ("from ..scan_schema import validate_scan_args\nfrom .. import ops\nfrom .graph_utils import meta_value\n"
              "import torch\n")
    assert import_violations("vmeanba_compiler.passes.fake_pass", source, "synthetic.py", known) == []
