"""One run per folder: an advisory lock (``fcntl.flock``) on ``<folder>/.medexgen.lock``.

The kernel holds a ``flock`` only while its process lives, so the lock of a run that was killed
is free again at once (the file stays, naming the last holder; the next run takes it over).
A process may take the same folder's lock again (``run`` -> its stages -> ``train``), and the
processes a holder starts (the runner's notebook kernels) share it: the holder puts the lock's
token in their environment (``MEDEXGEN_HELD_LOCKS``), and a process whose environment carries
the token the lock file holds is inside that run.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_FILE = ".medexgen.lock"
ENV_VAR = "MEDEXGEN_HELD_LOCKS"

_held: dict[str, list] = {}  # lock file -> [descriptor, depth] held by this process
_guard = threading.Lock()


class FolderInUse(RuntimeError):
    """Another process's run holds the folder's lock; the message names that process."""


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, setting: str = "paths.output_dir") -> Iterator[None]:
    """Hold ``folder``'s lock while the block runs; ``FolderInUse`` (naming the holder's pid, host,
    command and start) if another run holds it. ``setting`` is what the message suggests changing."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = str(folder.resolve() / LOCK_FILE)
    with _guard:
        if path in _held:  # this process holds it already
            _held[path][1] += 1
            counted = True
        else:
            counted = _acquire(path, folder, setting)
    try:
        yield
    finally:
        if counted:
            with _guard:
                _held[path][1] -= 1
                if _held[path][1] == 0:
                    _release(path)


def _acquire(path: str, folder: Path, setting: str) -> bool:
    """Take the lock (True), find it held by the run this process belongs to (False), or raise."""
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = _read_holder(descriptor)
        os.close(descriptor)
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP):  # a file system without flock
            log.warning("%s cannot be locked (%s); make sure no other run writes there", folder, exc.strerror)
            return False
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise OSError(f"cannot lock {folder} ({exc.strerror})") from None
        if holder.get("token") and _inherited().get(path) == holder["token"]:
            return False  # our parent's run (the runner of this kernel) holds it
        raise FolderInUse(
            f"{folder} is in use by another MedExGen run: pid {holder.get('pid', '?')} on "
            f"{holder.get('host', '?')} since {holder.get('started', '?')} "
            f"({holder.get('command', 'command unknown')}); wait for it to end, or set {setting} "
            "to another folder") from None
    token = uuid.uuid4().hex
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "command": " ".join(" ".join(sys.orig_argv).split())[:300], "token": token}
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, json.dumps(info).encode(), 0)
    _held[path] = [descriptor, 1]
    os.environ[ENV_VAR] = json.dumps({**_inherited(), path: token})
    return True


def _release(path: str) -> None:
    descriptor, _ = _held.pop(path)
    inherited = _inherited()
    inherited.pop(path, None)
    if inherited:
        os.environ[ENV_VAR] = json.dumps(inherited)
    else:
        os.environ.pop(ENV_VAR, None)
    os.ftruncate(descriptor, 0)  # the file stays: removing it could let two runs lock two files
    os.close(descriptor)


def _read_holder(descriptor: int) -> dict:
    try:
        holder = json.loads(os.pread(descriptor, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _inherited() -> dict:
    try:
        held = json.loads(os.environ.get(ENV_VAR, "{}"))
    except ValueError:
        return {}
    return held if isinstance(held, dict) else {}
