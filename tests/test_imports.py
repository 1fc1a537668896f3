"""The package's modules import one another one way only, and never inside a function."""
import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "fastexit"


def package_imports(tree: ast.AST):
    """(module name, at top level?) of every import of a fastexit module in ``tree``."""
    top = set(id(node) for node in tree.body)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names = [node.module.split(".")[0]] if node.module else [alias.name for alias in node.names]
            for name in names:
                yield name, id(node) in top


def graph():
    edges, nested = {}, []
    for path in PACKAGE.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for name, at_top in package_imports(tree):
            if name == "kernels":
                continue  # fastexit.kernels imports nothing of fastexit (tested by kernels' own rule)
            edges.setdefault(path.stem, set()).add(name)
            if not at_top:
                nested.append(f"{path.name} imports {name} inside a function")
    return edges, nested


def test_no_module_imports_the_package_inside_a_function():
    assert graph()[1] == []


def test_imports_form_no_circle():
    edges, _ = graph()
    state = {}

    def visit(module, trail):
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", " -> ".join(trail + [module])
        state[module] = "open"
        for other in sorted(edges.get(module, ())):
            visit(other, trail + [module])
        state[module] = "done"

    for module in sorted(edges):
        visit(module, [])
    assert {"model", "generate", "routing"} <= set(edges)  # the graph was really read


def test_kernels_import_nothing_of_fastexit():
    for path in (PACKAGE.parent / "kernels").glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert not any(n.startswith(("fastexit", "transformers")) for n in names), path.name
