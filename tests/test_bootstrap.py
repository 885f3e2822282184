"""The README's two commands: what `bootstrap test` and `bootstrap demo` run, and with which settings."""

import os
import subprocess

import pytest

from medexgen_lib import bootstrap


@pytest.fixture
def launched(monkeypatch):
    """Run ``bootstrap.main`` with the venv and the subprocess replaced; returns (args, env)."""
    calls = []
    monkeypatch.chdir(os.getcwd())  # main() enters the checkout: the next test file gets the folder back
    monkeypatch.setattr(bootstrap, "ensure_environment", lambda: "/venv/bin/python")
    monkeypatch.setattr(bootstrap.subprocess, "run",
                        lambda args, env=None: calls.append((args, env)) or subprocess.CompletedProcess(args, 0))

    def run(*argv):
        assert bootstrap.main(list(argv)) == 0
        return calls.pop()
    return run


def test_the_suite_runs_on_every_core_one_file_per_worker_one_thread_each(launched, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(bootstrap.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    args, env = launched("test", "-k", "labeler")
    assert args == ["/venv/bin/python", "-m", "pytest", "-n", "2", "--dist", "loadfile", "-k", "labeler"]
    assert env["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # a user's own setting wins
    assert launched("test")[1]["OMP_NUM_THREADS"] == "3"


def test_workers_are_capped_and_the_demo_keeps_the_users_environment(launched, monkeypatch):
    monkeypatch.setattr(bootstrap.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    args, _ = launched("test")
    assert args[args.index("-n") + 1] == str(bootstrap.MAX_TEST_WORKERS)
    args, env = launched("demo", "--seeds", "2")
    assert args[1:] == ["-m", "medexgen_lib", "run", "--profile", "demo", "--seeds", "2"] and env is None


@pytest.mark.parametrize("user_args, addopts, no_autoload", [
    (["-p", "no:xdist"], "", False), (["-pno:xdist", "-k", "x"], "", False), (["--pdb"], "", False),
    (["--trace"], "", False), ([], "-p no:xdist", False), ([], "", True),
    (["--disable-plugin-autoload"], "", False)])
def test_a_user_who_turns_xdist_off_or_debugs_gets_a_run_without_its_options(
        user_args, addopts, no_autoload, launched, monkeypatch):
    """``bootstrap test -p no:xdist`` added ``-n 2`` for a plugin that was not loaded: pytest
    stopped with a usage error (exit 4), as xdist did for ``--pdb``; no test ran."""
    monkeypatch.setenv("PYTEST_ADDOPTS", addopts)
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    if no_autoload:
        monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    args, env = launched("test", *user_args)
    assert args == ["/venv/bin/python", "-m", "pytest", *user_args] and env["OMP_NUM_THREADS"]
    # ... and xdist stays on where the user turns it back on or only names other plugins
    monkeypatch.setenv("PYTEST_ADDOPTS", "")
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    for kept in (["-p", "no:xdist", "-p", "xdist"], ["-p", "no:cacheprovider"], ["-n", "0"]):
        assert "--dist" in launched("test", *kept)[0]
    monkeypatch.setenv("PYTEST_ADDOPTS", "-k 'unbalanced")  # pytest reports it, bootstrap does not crash
    assert "--dist" in launched("test")[0]


def test_the_built_command_runs_pytest_with_and_without_xdist(launched, monkeypatch, tmp_path):
    """What bootstrap builds, run for real on a one-test file (in one worker, in one process)."""
    import sys

    (tmp_path / "test_one.py").write_text("def test_one():\n    assert True\n")
    monkeypatch.setattr(bootstrap.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.delenv("PYTEST_ADDOPTS", raising=False)
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    for user_args in ([], ["-p", "no:xdist"]):
        args, env = launched("test", *user_args, "-p", "no:cacheprovider", "-q", str(tmp_path / "test_one.py"))
        # Popen: the fixture replaced subprocess.run
        child = subprocess.Popen([sys.executable, *args[1:]], env=env, cwd=tmp_path, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        printed = child.communicate(timeout=120)[0]
        assert child.returncode == 0 and "1 passed" in printed, (user_args, printed)


def test_workers_follow_the_cores_this_process_may_use_not_the_machines(launched, monkeypatch):
    """A Slurm job, ``taskset`` or a cpuset container on a 64-core machine may use 2 of them:
    ``os.cpu_count()`` said 64 and the suite ran 4 workers on 2 cores."""
    monkeypatch.setattr(bootstrap.os, "cpu_count", lambda: 64)
    monkeypatch.setattr(bootstrap.os, "sched_getaffinity", lambda pid: {5, 9}, raising=False)
    args, _ = launched("test")
    assert args[args.index("-n") + 1] == "2"
    monkeypatch.delattr(bootstrap.os, "sched_getaffinity", raising=False)  # macOS, Windows: the machine's
    args, _ = launched("test")
    assert args[args.index("-n") + 1] == str(bootstrap.MAX_TEST_WORKERS)
