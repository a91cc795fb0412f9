"""The shape of the code: no import cycles, short functions, CuPy only in the CuPy backend."""

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "fastnn"
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(path: Path, modules: set) -> set:
    """The fastnn modules ``path`` imports when it runs (``if TYPE_CHECKING:`` blocks left out)."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)}
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            subs = {f"{target}.{a.name}" for a in node.names} & modules
            found |= subs or ({target} & modules)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names} & modules
    return found


def test_no_import_cycles():
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {m: runtime_imports(p, set(paths)) - {m} for m, p in paths.items()}
    cycles, state = [], {}

    def visit(m, stack):
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []
    assert "fastnn.backends.cupy_ops" in graph["fastnn.cuda_graph"]  # the checker sees imports


def test_no_function_longer_than_60_lines():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}")
    assert long == []


def test_cupy_is_imported_by_the_cupy_backend_only():
    importers = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n.split(".")[0] == "cupy" for n in names):
                importers.append(path.relative_to(PACKAGE).as_posix())
    assert sorted(set(importers)) == ["backends/cupy_ops.py", "cuda_graph.py"]
    r = subprocess.run([sys.executable, "-c", "import sys, fastnn; fastnn.MLP([4, 2]); print('cupy' in sys.modules)"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.stdout.strip() == "False", r.stderr


MAX_MODULE_LINES = 500


def test_no_module_longer_than_500_lines():
    long = {p.relative_to(REPO).as_posix(): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}


def test_the_stack_code_imports_nothing_private_from_the_training_loop():
    """fit_many runs on the loop's public pieces, as fit does: no ``_name`` imported across modules."""
    private = []
    for name in ("stack.py", "train.py", "sweep.py"):
        for node in ast.walk(ast.parse((PACKAGE / name).read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                private += [f"{name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert private == []
    stack_imports = runtime_imports(PACKAGE / "stack.py", {module_name(p) for p in PACKAGE.rglob("*.py")})
    assert "fastnn.loop" in stack_imports and "fastnn.train" not in stack_imports  # the loop, not fit's module


def test_one_place_for_defaults():
    """The run's defaults are written once, in fastnn.config: fit, fit_many, the CLI and the sweep read them."""
    import inspect

    import fastnn
    from fastnn import config, sweep
    from fastnn.cli import flags

    d = config.DEFAULTS
    for fn in (fastnn.fit, fastnn.fit_many):
        sig = inspect.signature(fn).parameters
        assert (sig["epochs"].default, sig["batch_size"].default, sig["optimizer"].default,
                sig["lr_schedule"].default) == (d.epochs, d.batch_size, d.optimizer, d.lr_schedule)
    assert flags.DEFAULTS["lr"] == d.lr and flags.DEFAULTS["epochs"] == d.epochs
    assert sweep.Settings().batch_size == d.batch_size and sweep.Settings().epochs == d.sweep_epochs
    literal_128 = [p.relative_to(REPO).as_posix() for p in PACKAGE.rglob("*.py") if p.name != "config.py"
                   and any(f"batch_size{sep}128" in p.read_text().replace(" ", "") for sep in ("=", ":int="))]
    assert literal_128 == []
