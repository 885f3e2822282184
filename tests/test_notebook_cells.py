"""Every notebook section re-runs from files on disk after a kernel restart: a code cell may use
only what it defines itself, the parameters cell and the set-up cell (read statically, no kernel)."""

import ast
import builtins

import nbformat
import pytest

from medexgen_lib.paths import NOTEBOOKS_DIR

NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))
IPYTHON_NAMES = {"display", "get_ipython"}


def _defined_and_used(source: str) -> tuple[set[str], set[str]]:
    tree = ast.parse("\n".join(line for line in source.splitlines() if not line.startswith(("%", "!"))))
    defined, used = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (defined if isinstance(node.ctx, (ast.Store, ast.Del)) else used).add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            defined.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.arg):
            defined.add(node.arg)
    return defined, used


def test_every_notebook_is_found():
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_each_section_depends_only_on_parameters_and_setup(path):
    """Sections start at a markdown heading; a code cell may use its own names, those of the
    parameters and set-up cells, and those of earlier cells of its own section."""
    cells = nbformat.read(path, as_version=4).cells
    code = [c for c in cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", []) and "load_config" in code[1].source
    shared = set(dir(builtins)) | IPYTHON_NAMES
    for cell in code[:2]:
        shared |= _defined_and_used(cell.source)[0]
    section: set[str] = set()
    for cell in cells[cells.index(code[1]) + 1:]:
        if cell.cell_type == "markdown":
            if cell.source.lstrip().startswith("#"):
                section = set()
            continue
        defined, used = _defined_and_used(cell.source)
        foreign = sorted(used - defined - shared - section)
        assert not foreign, (f"{path.name}, cell {cells.index(cell) + 1} uses {foreign} from another "
                             "section; after a kernel restart it cannot run alone: read it from disk")
        section |= defined
