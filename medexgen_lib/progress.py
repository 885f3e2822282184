"""Progress a person can watch in a headless run.

Inside a notebook the library reports progress twice: tqdm bars for JupyterLab
(which headless runs keep only in the executed copy) and compact lines on the
``medexgen_lib.progress`` logger ("epoch 3/16: train loss ...", "generating:
12/40 batch (30%), 21 s"). The notebooks send INFO logs to the kernel's stderr;
the pipeline runner hands papermill a ``StageProgress`` as ``stderr_file``, which
passes those lines (and warnings or errors) to the terminal and drops the rest
of the cells' output.
"""

from __future__ import annotations

import logging
import re
import time

from tqdm.auto import tqdm

PROGRESS_LOGGER = "medexgen_lib.progress"
LOG_EVERY_S = 10.0  # a progress bar logs a line at most this often (a fast loop logs none)
progress_log = logging.getLogger(PROGRESS_LOGGER)

_PROGRESS_LINE = re.compile(rf"{re.escape(PROGRESS_LOGGER)}: (.*)")
# A log record's first line: the level, after at most a date and a time.
_RECORD_LINE = re.compile(r"^(?:\S+ ){0,2}?(DEBUG|INFO|WARNING|ERROR|CRITICAL)\b")
CONTINUATION_LINES = 20  # lines of a multi-line warning or error (a traceback) passed on
# A traceback's last line ("ValueError: ..."): passed on even past CONTINUATION_LINES.
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Warning)(?::|$)")


class ProgressBar(tqdm):
    """``tqdm.auto`` bar that also logs ``desc: i/n unit (p%), s`` on the progress logger
    at most every ``LOG_EVERY_S`` seconds as it advances, and a last line when it closes
    if it logged any (a disabled bar logs nothing). Works iterated or with ``update()``."""

    def __init__(self, *args, **kwargs):
        # Set before tqdm's own set-up: if that raises, the half-made bar's close() (from
        # tqdm's __del__) still finds them.
        self._began = self._last_line = time.monotonic()
        self._logged = self._closed = False
        super().__init__(*args, **kwargs)

    def update(self, n: float = 1) -> bool | None:
        shown = super().update(n)
        now = time.monotonic()
        if not self.disable and now - self._last_line >= LOG_EVERY_S:
            self._last_line, self._logged = now, True
            share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
            progress_log.info("%s: %d/%s %s%s, %.0f s", self.desc, self.n, self.total or "?",
                              self.unit, share, now - self._began)
        return shown

    def close(self) -> None:
        if self._logged and not self._closed:
            progress_log.info("%s: done, %d %s in %.0f s", self.desc, self.n, self.unit,
                              time.monotonic() - self._began)
        self._closed = True
        super().close()


class StageProgress:
    """A write-only text stream (papermill's ``stderr_file``) that passes a stage's progress
    lines and its warnings/errors to ``logger``, prefixed with the stage, and drops the rest."""

    def __init__(self, stage: str, logger: logging.Logger):
        self.stage = stage
        self.logger = logger
        self._partial = ""
        self._continuation = 0  # lines still to pass on after a warning or error
        self._in_record = False  # inside a warning or error's continuation lines

    def write(self, text: str) -> int:
        """Take a chunk of the kernel's stderr; complete lines are filtered at once."""
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            self._handle(line.rstrip("\r"))
        return len(text)

    def flush(self) -> None:
        """Nothing is buffered but a line still being written."""

    def close(self) -> None:
        """Handle a last line without a newline."""
        if self._partial:
            self._handle(self._partial)
            self._partial = ""

    def _handle(self, line: str) -> None:
        progress, record = _PROGRESS_LINE.search(line), _RECORD_LINE.match(line)
        if progress:
            self._continuation, self._in_record = 0, False
            self.logger.info("[%s] %s", self.stage, progress.group(1))
        elif record and record.group(1) in ("WARNING", "ERROR", "CRITICAL"):
            self._continuation, self._in_record = CONTINUATION_LINES, True
            self.logger.warning("[%s] %s", self.stage, line)
        elif record:
            self._continuation, self._in_record = 0, False
        elif self._continuation and line.strip():
            self._continuation -= 1
            self.logger.warning("[%s] %s", self.stage, line)
        elif self._in_record and _EXCEPTION_LINE.match(line):
            self.logger.warning("[%s] %s", self.stage, line)
