"""The package's layering (README, "Layout"), checked from the source with ``ast``.

Each module belongs to a layer; a module may import its own layer and the ones below,
never one above, and no set of modules may import each other round in a cycle. Imports
inside functions count (a lazy import is still a dependency; two of them once hid a
cycle between ``models`` and ``train``); imports under ``if TYPE_CHECKING:`` do not (they
never run).
"""

from __future__ import annotations

import ast
import re
import textwrap
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# Lowest first. A module's layer is the one of the longest prefix that names it.
LAYERS: dict[str, int] = {
    "imgclf": 0,  # the root package: __version__ and lazy exports by name only
    "imgclf.errors": 0,
    "imgclf.paths": 0,
    "imgclf.io_utils": 0,
    "imgclf.csv_safe": 0,  # above io_utils, whose atomic writes it uses
    "imgclf.runtime": 1,  # checkpoints, device, torchrun, ONNX Runtime
    "imgclf.data": 2,
    "imgclf.models": 3,
    "imgclf.evaluate.metrics": 4,  # scoring: what training and inference both use
    "imgclf.evaluate.plots": 4,
    "imgclf.evaluate.calibration": 4,
    "imgclf.evaluate.mistakes": 4,
    "imgclf.evaluate.tta": 4,
    "imgclf.ensemble": 4,
    "imgclf.train": 5,
    "imgclf.inference": 5,
    "imgclf.evaluate": 6,  # the package's callable imgclf.evaluate(...), runs, compare
    "imgclf.predict": 6,
    "imgclf.predictor": 6,
    "imgclf.serve": 6,
    "imgclf.report": 6,
    "imgclf.export": 6,
    "imgclf.export_int8": 6,  # export --int8: above export, whose graph it quantizes
    "imgclf.demo": 6,
    "imgclf.cli": 7,
    "imgclf.__main__": 7,
}
# Peers in one layer that must not import each other either: training and inference
# share only what lies below them.
APART = (("imgclf.train", "imgclf.inference"),)


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking_only(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _imports(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """Every imgclf module ``tree`` imports (``from X import y`` is X.y where that is a
    module), skipping ``if TYPE_CHECKING:`` blocks."""
    found: set[str] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        if _type_checking_only(node):
            stack.extend(getattr(node, "orelse", []))
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "imgclf"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join([*package, *([base] if base else [])])
            if base.split(".")[0] == "imgclf":
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    found.add(sub if sub in known else base)
        stack.extend(ast.iter_child_nodes(node))
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    files = {module_name(p, root): p for p in sorted((root / "imgclf").rglob("*.py"))}
    known = set(files)
    return {
        name: _imports(ast.parse(path.read_text()), name, path.name == "__init__.py", known)
        - {name}
        for name, path in files.items()
    }


def layer_of(module: str) -> tuple[str, int] | None:
    """The layer of the longest prefix in LAYERS; the root names only itself (a new
    top-level module must be given a layer)."""
    parts = module.split(".")
    for n in range(len(parts), 1, -1):
        prefix = ".".join(parts[:n])
        if prefix in LAYERS:
            return prefix, LAYERS[prefix]
    return ("imgclf", 0) if module == "imgclf" else None


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _apart(module: str, target: str, pair: tuple[str, str]) -> bool:
    a, b = pair
    return (_within(module, a) and _within(target, b)) or (
        _within(module, b) and _within(target, a)
    )


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for module, targets in sorted(graph.items()):
        here = layer_of(module)
        if here is None:
            problems.append(f"{module}: in no layer (add it to LAYERS)")
            continue
        for target in sorted(targets):
            there = layer_of(target)
            if there is None:
                problems.append(f"{module} imports {target}, which is in no layer")
            elif there[1] > here[1]:
                problems.append(f"{module} (layer {here[1]}) imports {target} (layer {there[1]})")
            elif any(_apart(module, target, pair) for pair in APART):
                problems.append(f"{module} imports {target}: these two stay apart")
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_a_layer_above_its_own():
    assert upward_imports(import_graph(SRC)) == []


def test_no_import_cycle():
    assert cycles(import_graph(SRC)) == []


def test_the_checker_finds_a_lazy_upward_import_and_a_cycle(tmp_path):
    """The checks above pass only if they can fail: a planted upward import inside a
    function, a cycle through relative imports, and a TYPE_CHECKING import that is fine."""
    pkg = tmp_path / "imgclf"
    files = {
        "__init__.py": "",
        "errors.py": "",
        "models/__init__.py": "",
        "models/base.py": """
            from typing import TYPE_CHECKING
            if TYPE_CHECKING:
                from imgclf.cli import main  # never runs: allowed
            def build():
                from imgclf.train import loop  # lazy, and upward
        """,
        "train/__init__.py": "",
        "train/loop.py": "from . import budget\n",
        "train/budget.py": "from .loop import x\n",
        "cli.py": "",
    }
    for rel, text in files.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(textwrap.dedent(text))
    graph = import_graph(tmp_path)
    assert graph["imgclf.models.base"] == {"imgclf.train.loop"}
    assert upward_imports(graph) == [
        "imgclf.models.base (layer 3) imports imgclf.train.loop (layer 5)"
    ]
    assert cycles(graph) == [["imgclf.train.budget", "imgclf.train.loop"]]


def test_the_root_names_only_itself():
    assert layer_of("imgclf") == ("imgclf", 0)
    assert layer_of("imgclf.train.loop") == ("imgclf.train", 5)
    assert layer_of("imgclf.newthing") is None  # a new top-level module needs a layer


# ---------------------------------------------------------------- README's Layout

README = SRC.parent / "README.md"


def layout_entries(readme: str) -> dict[str, str]:
    """The Layout block's entries under src/imgclf/: name → its description (the
    indented lines that follow it)."""
    block = readme.split("## Layout", 1)[1].split("```")[1]
    entries: dict[str, str] = {}
    current = None
    for line in block.splitlines():
        if line.startswith("  ") and not line.startswith("   "):  # an entry: 2 spaces in
            current, _, rest = line.strip().partition(" ")
            entries[current] = rest
        elif line.startswith("   ") and current:
            entries[current] += " " + line.strip()
        else:
            current = None  # top-level lines (recipes/, benchmarks/) are not the package's
    return entries


def test_readme_layout_names_every_module_of_the_package_and_no_other():
    entries = layout_entries(README.read_text())
    package = SRC / "imgclf"
    on_disk = {
        p.name + ("/" if p.is_dir() else "")
        for p in package.iterdir()
        if not p.name.startswith(("_", ".")) and p.name != "recipes" and p.suffix != ".pyc"
    }
    assert set(entries) == on_disk
    for name, text in entries.items():
        if name.endswith("/"):  # every module a package's line names is there
            for module in re.findall(r"\b(\w+\.py)\b", text):
                assert (package / name / module).is_file(), f"{name}{module} in README"
            mentioned = set(re.findall(r"\b(\w+)\.py\b", text))
            missing = {
                p.stem for p in (package / name).glob("*.py") if not p.stem.startswith("_")
            } - mentioned
            assert not missing or name in SUMMARISED, f"{name}: {sorted(missing)} not in README"


# Packages whose README line describes them as a whole rather than file by file.
SUMMARISED = {"models/", "serve/", "report/", "cli/"}


# ---------------------------------------------------------------- sizes

# Issue #29's limits: a function reads on one screen, a module in one sitting. Where a
# table or a parser makes length natural, name it here with the reason.
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 600
LONG_ALLOWED: dict[str, str] = {}


def test_functions_and_modules_stay_short():
    too_long = []
    for path in sorted((SRC / "imgclf").rglob("*.py")):
        text = path.read_text()
        name = module_name(path, SRC)
        if len(text.splitlines()) > MAX_MODULE_LINES and name not in LONG_ALLOWED:
            too_long.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                where = f"{name}.{node.name}"
                if lines > MAX_FUNCTION_LINES and where not in LONG_ALLOWED:
                    too_long.append(f"{where}: {lines} lines")
    assert too_long == []
