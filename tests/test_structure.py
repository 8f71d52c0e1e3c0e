"""The package's shape: stage folders, commands on top, no import cycle, short files and
functions (read from the source with `ast`)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "motg_fast"
COMMANDS = {"motg_fast.train", "motg_fast.evaluate", "motg_fast.compare"}
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 60
MAX_KERNEL_LINES = 90  # the body of a @triton.jit function (its argument list apart)


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules `name` imports anywhere in its file (lazy imports included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            candidates = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found |= {c for c in candidates if c in modules and c != name}
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_no_library_module_imports_a_command():
    graph = _graph()
    offenders = {m: sorted(graph[m] & COMMANDS) for m in graph if m not in COMMANDS}
    assert not {m: c for m, c in offenders.items() if c}


def test_the_stage_folders_say_what_they_hold():
    for folder in ("kernels", "rollout", "training", "tasks", "evaluation", "integrations"):
        doc = ast.get_docstring(ast.parse((PACKAGE / folder / "__init__.py").read_text()))
        assert doc and doc.strip(), folder


def _is_kernel(node: ast.FunctionDef) -> bool:
    return any(
        (isinstance(d, ast.Name) and d.id == "jit")
        or (isinstance(d, ast.Attribute) and d.attr == "jit")
        for d in node.decorator_list
    )


def test_files_and_functions_stay_short():
    long_files, long_functions = [], []
    for name, path in _modules().items():
        text = path.read_text()
        if len(text.splitlines()) > MAX_FILE_LINES:
            long_files.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                kernel = _is_kernel(node)
                first = node.body[0].lineno if kernel else node.lineno  # a kernel's body
                length = node.end_lineno - first + 1
                limit = MAX_KERNEL_LINES if kernel else MAX_FUNCTION_LINES
                if length > limit:
                    long_functions.append(f"{name}.{node.name}: {length} > {limit}")
    assert not long_files and not long_functions, long_files + long_functions
