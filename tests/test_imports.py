"""Imports flow one way: no circle between the package's modules, and no lower module importing a
higher one. Read with ``ast`` (module-level and function-level imports alike), nothing is executed."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "medexgen_lib"

# Lowest first. A module may import modules of its own layer or of lower ones only; every module
# of the package must be placed here (a new one is placed by whoever adds it).
LAYERS = (
    {"__init__", "paths", "files", "progress", "locks", "bootstrap"},
    {"labeler", "text", "nltk_bleu", "phantom", "reports", "splits", "annotation", "mimic", "mimic_sections"},
    {"sides"},
    {"metrics"},
    {"config", "tracking", "model_card"},
    {"images", "tokenizer", "dataset", "acquisition", "realtext", "phantom_layouts", "eda", "preprocess"},
    {"guidance", "report_edits", "planning"},
    {"model", "postprocess"},
    {"reporting", "features", "inference", "checkpoints", "optimization", "validation", "history"},
    {"train", "evaluate"},
    {"visualize", "inspector"},
    {"pipeline", "seeds", "ablation", "bench", "labeler_agreement", "__main__"},
)


def package_imports(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module name -> the package modules it imports anywhere in its file: ``import
    medexgen_lib.x``, ``from medexgen_lib.x import ...``, ``from medexgen_lib import x``, relative
    imports, ``medexgen_lib.x`` reached through a bare ``import medexgen_lib`` and
    ``importlib.import_module("medexgen_lib.x")``, at module level or inside functions."""
    modules = {path.stem for path in package.glob("*.py")}
    graph = {}
    for path in sorted(package.glob("*.py")):
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[1] for alias in node.names
                          if alias.name.startswith(f"{package.name}.")}
            elif isinstance(node, ast.ImportFrom):
                parts = ([package.name] if node.level else []) + (node.module or "").split(".")
                parts = [part for part in parts if part]
                if parts[:1] != [package.name]:
                    continue
                if len(parts) > 1:
                    found.add(parts[1])
                else:  # from medexgen_lib import guidance, planning
                    found |= {alias.name for alias in node.names if alias.name in modules}
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id == package.name and node.attr in modules:
                found.add(node.attr)  # import medexgen_lib ... medexgen_lib.x
            elif isinstance(node, ast.Call) and _called_name(node.func) == "import_module" and node.args \
                    and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str) \
                    and node.args[0].value.startswith(f"{package.name}."):
                found.add(node.args[0].value.split(".")[1])
        graph[path.stem] = found - {path.stem}
    return graph


def _called_name(func: ast.expr) -> str:
    """``f`` for a call of ``f(...)`` or ``module.f(...)``."""
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of ``graph`` as a path that returns to its start, or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def layer_violations(graph: dict[str, set[str]], layers=LAYERS) -> list[str]:
    """``importer -> imported`` for every import of a module from a higher layer."""
    level = {name: at for at, layer in enumerate(layers) for name in layer}
    return sorted(f"{module} (layer {level[module]}) -> {imported} (layer {level[imported]})"
                  for module, imports in graph.items() for imported in imports
                  if level[imported] > level[module])


def test_the_checker_sees_every_kind_of_import_and_finds_a_circle(tmp_path):
    package = tmp_path / "medexgen_lib"
    package.mkdir()
    (package / "a.py").write_text("def f():\n    from medexgen_lib.b import g\n")
    (package / "b.py").write_text("import medexgen_lib.c\n")
    (package / "c.py").write_text("from medexgen_lib import a\nfrom . import d\n")
    (package / "d.py").write_text("import os\n")
    # reached without an import statement naming the module
    (package / "e.py").write_text("import medexgen_lib\n\ndef f():\n    return medexgen_lib.a.f\n")
    (package / "f.py").write_text("import importlib\n\nB = importlib.import_module('medexgen_lib.b')\n")
    graph = package_imports(package)
    assert graph == {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"a"}, "f": {"b"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert layer_violations(graph, ({"b", "c", "d"}, {"a", "e", "f"})) == ["c (layer 0) -> a (layer 1)"]


def test_every_module_has_a_layer():
    placed = set().union(*LAYERS)
    assert sorted(set(package_imports()) - placed) == []
    assert sorted(placed - set(package_imports())) == []


def test_no_import_circle():
    assert find_cycle(package_imports()) is None


def test_no_lower_module_imports_a_higher_one():
    assert layer_violations(package_imports()) == []


def test_the_training_loop_stays_readable():
    """train.py holds the loop; checkpoints, history files and plots, validation and the optimiser's
    parts live in their own modules."""
    lines = len((PACKAGE / "train.py").read_text().splitlines())
    assert lines <= 400, f"train.py has {lines} lines"


def test_the_split_out_modules_type_their_public_functions():
    """The modules train.py, evaluate.py, model.py and guidance.py were split into annotate every
    parameter and return of their public functions and methods (``_validate`` became the public
    ``validation.validate`` untyped; ``FrozenFeatures`` lost its ``model`` type on the move)."""
    untyped = []
    for name in ("reporting", "features", "checkpoints", "history", "validation", "optimization",
                 "postprocess", "report_edits", "sides"):
        tree = ast.parse((PACKAGE / f"{name}.py").read_text())
        members = [n for c in tree.body if isinstance(c, ast.ClassDef) and not c.name.startswith("_")
                   for n in c.body]
        for node in tree.body + members:  # module functions and methods, not nested helpers
            if not isinstance(node, ast.FunctionDef) or (node.name.startswith("_") and node.name != "__init__"):
                continue
            arguments = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
            missing = [a.arg for a in arguments if a.annotation is None and a.arg not in ("self", "cls")]
            untyped += [f"{name}.{node.name}({', '.join(missing)})"] if missing else []
            untyped += [f"{name}.{node.name} -> ?"] if node.returns is None else []
    assert untyped == []
