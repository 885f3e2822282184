"""Set-up and entry for a fresh machine: needs only Python (standard library here).

    python3 -m medexgen_lib.bootstrap demo [runner args]   # the demo pipeline
    python3 -m medexgen_lib.bootstrap test [pytest args]   # the test suite

Creates ``.venv`` and installs ``requirements.txt`` plus this package (editable)
when the venv is missing or those files changed since the last install, then
runs the command inside the venv. The suite runs on one pytest-xdist worker per CPU core
(at most ``MAX_TEST_WORKERS``), each test file on one worker (its module fixtures built
once), each worker on one thread (``OMP_NUM_THREADS=1``, unless set): two workers with two
threads each on two cores spin against each other. ``-n 0`` runs it in one process; with
``-p no:xdist``, ``--pdb`` or ``--trace`` no xdist option is added (pytest would refuse it).
"""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("MEDEXGEN_VENV", ROOT / ".venv"))
STAMP = VENV / ".medexgen-installed"
MAX_TEST_WORKERS = 4
COMMANDS = {
    "demo": ["-m", "medexgen_lib", "run", "--profile", "demo"],
    "test": ["-m", "pytest"],
}


def _requirements_digest() -> str:
    digest = hashlib.sha256()
    for name in ("requirements.txt", "pyproject.toml"):
        digest.update((ROOT / name).read_bytes())
    return digest.hexdigest()


def ensure_environment() -> Path:
    """Create and fill the venv if needed; return its Python."""
    python = VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    wanted = _requirements_digest()
    if python.exists() and STAMP.exists() and STAMP.read_text().strip() == wanted:
        return python
    if not python.exists():
        print(f"[bootstrap] creating virtual environment {VENV}", flush=True)
        venv.create(VENV, with_pip=True)
    print("[bootstrap] installing requirements (first time: a few minutes)", flush=True)
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "-r", str(ROOT / "requirements.txt")], check=True)
    subprocess.run([*pip, "--no-deps", "-e", str(ROOT)], check=True)
    STAMP.write_text(wanted)
    return python


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python3 -m medexgen_lib.bootstrap {{{'|'.join(COMMANDS)}}} [args...]",
              file=sys.stderr)
        return 2
    python = ensure_environment()
    os.chdir(ROOT)
    command, env = [str(python), *COMMANDS[argv[0]]], None
    if argv[0] == "test":
        if _xdist_wanted(argv[1:]):
            command += ["-n", str(min(_cores(), MAX_TEST_WORKERS)), "--dist", "loadfile"]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run([*command, *argv[1:]], env=env).returncode


def _cores() -> int:
    """The cores this process may run on: a Slurm job, taskset or a cpuset container gets fewer
    than the machine has (``os.cpu_count``), and more workers than those spin against each other."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # no affinity on macOS and Windows
        return os.cpu_count() or 1


def _xdist_wanted(args: list[str]) -> bool:
    """Whether ``-n``/``--dist`` may be added to the user's pytest ``args``: not when they turn
    pytest-xdist off (``-p no:xdist``, here or in ``PYTEST_ADDOPTS``; plugin autoloading off
    without ``-p xdist.plugin``) or debug (``--pdb``, ``--trace``: one process). pytest refuses
    ``-n`` without the plugin, and xdist ``-n 2`` with ``--pdb``: the suite would not run."""
    try:
        words = [*shlex.split(os.environ.get("PYTEST_ADDOPTS", "")), *args]
    except ValueError:  # unbalanced quotes: pytest says so itself
        words = list(args)
    autoload = not (os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD") or "--disable-plugin-autoload" in words)
    blocked = explicit = False
    for k, word in enumerate(words):  # -p NAME or -pNAME, as pytest reads them
        plugin = (words[k + 1] if word == "-p" and k + 1 < len(words)
                  else word[2:] if word.startswith("-p") and not word.startswith("--") else "")
        blocked = {"no:xdist": True, "xdist": False}.get(plugin.strip(), blocked)
        explicit |= plugin.strip() == "xdist.plugin"
    return not blocked and (autoload or explicit) and not {"--pdb", "--trace"} & set(words)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
