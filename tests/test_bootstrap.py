"""The README's two commands: what `bootstrap test` and `bootstrap demo` run, and with which settings."""

import subprocess

import pytest

from medexgen_lib import bootstrap


@pytest.fixture
def launched(monkeypatch):
    """Run ``bootstrap.main`` with the venv and the subprocess replaced; returns (args, env)."""
    calls = []
    monkeypatch.setattr(bootstrap, "ensure_environment", lambda: "/venv/bin/python")
    monkeypatch.setattr(bootstrap.subprocess, "run",
                        lambda args, env=None: calls.append((args, env)) or subprocess.CompletedProcess(args, 0))

    def run(*argv):
        assert bootstrap.main(list(argv)) == 0
        return calls.pop()
    return run


def test_the_suite_runs_on_every_core_one_file_per_worker_one_thread_each(launched, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(bootstrap.os, "cpu_count", lambda: 2)
    args, env = launched("test", "-k", "labeler")
    assert args == ["/venv/bin/python", "-m", "pytest", "-n", "2", "--dist", "loadfile", "-k", "labeler"]
    assert env["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # a user's own setting wins
    assert launched("test")[1]["OMP_NUM_THREADS"] == "3"


def test_workers_are_capped_and_the_demo_keeps_the_users_environment(launched, monkeypatch):
    monkeypatch.setattr(bootstrap.os, "cpu_count", lambda: 64)
    args, _ = launched("test")
    assert args[args.index("-n") + 1] == str(bootstrap.MAX_TEST_WORKERS)
    args, env = launched("demo", "--seeds", "2")
    assert args[1:] == ["-m", "medexgen_lib", "run", "--profile", "demo", "--seeds", "2"] and env is None
