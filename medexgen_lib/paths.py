"""Project locations that do not depend on the run's configuration."""

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = PACKAGE_DIR.parent
NOTEBOOKS_DIR = PROJECT_ROOT / "notebooks"


def default_root() -> Path:
    """Where the default data and output folders go: the project checkout for a run started in
    it (its root, or notebooks/ as JupyterLab's kernels are), else the folder the run is started
    in; where the package happens to be installed never decides it."""
    cwd = Path.cwd().resolve()
    return PROJECT_ROOT if cwd == PROJECT_ROOT or PROJECT_ROOT in cwd.parents else cwd
