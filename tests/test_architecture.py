"""The package's shape: no import circles, no import of the project's own modules hidden inside a function,
and every module in a wing (the top level holds only the CLI and the errors)."""

from __future__ import annotations

import ast
from pathlib import Path

import quantize_pipeline

PACKAGE = Path(quantize_pipeline.__file__).parent
TOP_LEVEL_MODULES = {"__init__", "cli", "errors"}


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _own_imports(modules: dict[str, Path]) -> tuple[dict[str, set[str]], list[str]]:
    """({module: the project modules it imports anywhere in its text}, ["module:line" of imports inside functions])."""
    graph: dict[str, set[str]] = {name: set() for name in modules}
    nested: list[str] = []

    def visit(module: str, node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            targets = []
            if isinstance(child, ast.ImportFrom) and (child.module or "").startswith("quantize_pipeline"):
                targets = [f"{child.module}.{alias.name}" if f"{child.module}.{alias.name}" in modules else child.module
                           for alias in child.names]
            elif isinstance(child, ast.Import):
                targets = [alias.name for alias in child.names if alias.name.startswith("quantize_pipeline")]
            graph[module].update(targets)
            if targets and in_function:
                nested.append(f"{module}:{child.lineno}")
            visit(module, child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    for name, path in modules.items():
        visit(name, ast.parse(path.read_text()), False)
    return graph, nested


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module, or of one importing itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strong(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                strong(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            strong(node)
    return found


def test_the_project_has_no_import_circles():
    graph, _ = _own_imports(_modules())
    assert _cycles(graph) == []


def test_a_circle_is_found_when_there_is_one():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_own_module_is_imported_inside_a_function():
    # Lazy imports of torch, vLLM, Quark or lm-eval are fine (seconds of start-up); the project's own modules
    # import nothing heavy at their top, so an import of one inside a function could only hide a circle.
    _, nested = _own_imports(_modules())
    assert nested == []


def test_every_module_lives_in_a_wing():
    top_level = {path.stem for path in PACKAGE.glob("*.py")}
    assert top_level == TOP_LEVEL_MODULES
    wings = {path.parent.name for path in PACKAGE.glob("*/__init__.py")}
    assert wings == {"commands", "engines", "evaluate", "formats", "publish", "quantize", "recipe", "run", "verdict",
                     "verify"}
    for wing in wings:  # each says what it holds, for the newcomer reading the tree
        assert ast.get_docstring(ast.parse((PACKAGE / wing / "__init__.py").read_text())), wing


ENGINE_NAMES = {"vllm", "transformers", "bitsandbytes-int8", "bitsandbytes-nf4", "vllm-cuda", "vllm-rocm", "vllm-cpu"}
# A comparison with one of those strings that is not about an engine.
NOT_AN_ENGINE = {("quantize/quark_import.py", "folder.parent.name")}  # transformers' package folder


def test_no_string_compare_on_an_engine_name_outside_engines():
    found = []
    for path in PACKAGE.rglob("*.py"):
        where = path.relative_to(PACKAGE).as_posix()
        if where.startswith("engines/"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Compare):
                continue
            operands = [node.left, *node.comparators]
            for operand in operands:
                values = [operand] + (list(operand.elts) if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) else [])
                if any(isinstance(value, ast.Constant) and value.value in ENGINE_NAMES for value in values):
                    others = {ast.unparse(other) for other in operands if other is not operand}
                    if not any((where, other) in NOT_AN_ENGINE for other in others):
                        found.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
    assert found == []
