"""The layout's one rule, checked: imports point one way. Inside visualize/, a module imports only the
modules below it in its __init__'s list; outside, no module imports a script."""
import ast
import re

from conftest import ROOT

SCRIPTS = {p.stem for p in ROOT.glob("*.py") if p.stem.startswith("plot_") or p.stem == "train"}


def imported(path):
    """Every module `path` imports by name: 'visualize.cli' for `from visualize import cli`, 'x' for `import x`."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            if node.module == "visualize":
                names |= {f"visualize.{alias.name}" for alias in node.names}
    return names


def test_visualize_modules_import_only_the_modules_below_them():
    doc = ast.get_docstring(ast.parse((ROOT / "visualize" / "__init__.py").read_text(encoding="utf-8")))
    order = re.findall(r"^    (\w+)\s", doc, flags=re.M)
    modules = {p.stem for p in (ROOT / "visualize").glob("*.py") if p.stem != "__init__"}
    assert set(order) == modules  # every module listed, once
    upward = [(p.stem, name) for p in (ROOT / "visualize").glob("*.py") if p.stem != "__init__"
              for name in imported(p) if name.startswith("visualize.")
              and order.index(name.split(".")[1]) <= order.index(p.stem)]
    assert not upward, upward


def test_no_module_imports_a_script():
    """plot_all.py runs the plot scripts by name (importlib), as a user would run each; nothing imports one."""
    paths = [*ROOT.glob("*.py"), *(ROOT / "visualize").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]
    found = [(p.name, name) for p in paths for name in imported(p) if name in SCRIPTS]
    assert not found, found
