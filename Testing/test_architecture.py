"""The engine's layout as README's "Architecture" section states it: packages by concern whose imports point
one way, no import cycle between modules, and Slicer known only to `JointRegSegLib.slicer`.

Every import statement counts, those inside functions too (the engine imports lazily for start-up time,
and a lazy import is still a dependency)."""
from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LIB = REPO / "JointRegSegLib"
SLICER_MODULES = {"slicer", "vtk", "qt", "ctk", "mrml", "vtkSegmentationCore", "vtkITK", "vtkSlicer"}

# which package may import which: the layers, bottom up ("top" = the package's own cli.py, demo.py, __init__.py)
ALLOWED = {
    "core": set(),
    "io": {"core"},
    "models": {"core"},
    "inference": {"core", "io", "models"},
    "data": {"core", "io", "models", "inference"},
    "evaluation": {"core", "io", "models", "inference", "data"},
    "training": {"core", "io", "models", "inference", "data", "evaluation"},
    "cohort": {"core", "io", "models", "inference"},
    "slicer": {"core", "io", "models", "inference"},
    "top": {"core", "io", "models", "inference", "data", "evaluation", "training", "cohort"},
}


def _modules() -> dict[str, tuple[Path, bool]]:
    found = {}
    for path in LIB.rglob("*.py"):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        package = parts[-1] == "__init__"
        if package:
            parts = parts[:-1]
        found[".".join(parts)] = (path, package)
    return found


def _imports(name: str, path: Path, package: bool) -> list[tuple[str, int]]:
    """(absolute module or name imported, line) for every import statement of a module."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if package else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((target, node.lineno))
            out += [(f"{target}.{alias.name}", node.lineno) for alias in node.names]
    return out


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and (LIB / parts[1]).is_dir() else "top"


def _graph():
    modules = _modules()
    edges = defaultdict(set)
    for name, (path, package) in modules.items():
        for target, line in _imports(name, path, package):
            if target in modules and target != name:
                edges[name].add((target, line))
    return modules, edges


def test_no_import_cycle_between_modules():
    modules, edges = _graph()
    state, cycles = {}, []

    def visit(module, stack):
        state[module] = "open"
        stack.append(module)
        for target, _ in sorted(edges[module]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, stack)
        stack.pop()
        state[module] = "done"

    for module in sorted(modules):
        if module not in state:
            visit(module, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_imports_point_down_the_layers():
    modules, edges = _graph()
    wrong = []
    for module, targets in edges.items():
        for target, line in targets:
            here, there = _layer(module), _layer(target)
            if target == "JointRegSegLib" or here == there:
                continue      # the package __init__ (lazy names, import_monai_lean) and imports within a layer
            if there not in ALLOWED[here]:
                wrong.append(f"{modules[module][0].relative_to(REPO)}:{line}: {here} imports {there} ({target})")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_only_the_slicer_package_imports_slicer():
    offenders = []
    for name, (path, package) in _modules().items():
        if _layer(name) == "slicer":
            continue
        for target, line in _imports(name, path, package):
            if target.split(".")[0] in SLICER_MODULES:
                offenders.append(f"{path.relative_to(REPO)}:{line}: {target}")
    assert not offenders, "Slicer imported outside JointRegSegLib/slicer:\n" + "\n".join(offenders)


def test_every_layer_is_known_and_readme_lists_the_layout():
    packages = sorted(p.name for p in LIB.iterdir() if (p / "__init__.py").is_file())
    assert set(packages) | {"top"} == set(ALLOWED), "a package without a place in the layers (ALLOWED)"
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Architecture", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"JointRegSegLib/(\w+)/", section))
    assert listed == set(packages), f"README's Architecture lists {sorted(listed)}; the code has {packages}"
    for package in packages:      # each package's modules are named in its README line
        modules = sorted(p.stem for p in (LIB / package).glob("*.py") if p.stem != "__init__")
        line = next(text for text in section.splitlines() if f"JointRegSegLib/{package}/" in text)
        missing = [m for m in modules if not re.search(rf"\b{m}\b", line)]
        assert not missing, f"README's Architecture line for {package}/ does not name {missing}"
