"""The project's modules import one way: no cycle (counting imports inside functions too, so none can hide one)
and the data package never imports the command-line module (cli.py)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def project_modules():
    """{module name: path} for the repo's own modules (top level and the data package)."""
    files = [*ROOT.glob("*.py"), *ROOT.glob("data/*.py")]
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p for p in files}


def imports(name, path, modules):
    """The project modules that `name` imports anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from .records import y
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # from data import builtin: a module
    return {m for m in found if m in modules and m != name}


def graph():
    modules = project_modules()
    return {name: imports(name, path, modules) for name, path in modules.items()}


def find_cycle(edges):
    """One import cycle as a list of modules, or None (depth-first search)."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(edges):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_the_graph_sees_the_imports():  # guards the test itself: an empty graph would pass everything
    edges = graph()
    assert {"checkpoint", "cli", "data.format"} <= edges["eval"]
    assert "data.records" in edges["data.format"] and "data.builtin" in edges["data"]


def test_no_import_cycle():
    assert find_cycle(graph()) is None


def test_data_does_not_import_the_command_line():
    edges = graph()
    assert not {m for m, deps in edges.items() if m.split(".")[0] == "data" and "cli" in deps}


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
