"""Run the numbered notebooks headless, in order, with papermill."""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medexgen_lib.config import load_config
from medexgen_lib.files import write_json
from medexgen_lib.locks import folder_lock
from medexgen_lib.paths import NOTEBOOKS_DIR
from medexgen_lib.progress import StageProgress
from medexgen_lib.tracking import resolve_log_with

log = logging.getLogger(__name__)

KILL_AFTER_S = 15  # after a Ctrl-C, a cell that has not stopped by then has its kernel killed
STAGE_NAME = re.compile(r"^(\d\d)_\w+\.ipynb$")
# Main outputs per stage, relative to paths.data_dir (d) or paths.output_dir (o), for the summary.
STAGE_OUTPUTS = {
    "01": ["d:processed/studies.parquet"],
    "02": ["o:logs/eda_stats.json", "o:plots/eda_counts.png"],
    "03": ["d:processed/splits.json", "d:processed/tokenizer", "d:processed/preprocessing.json"],
    "04": ["o:logs/history.jsonl", "o:models/final", "o:plots/training_curves.png"],
    "05": ["o:logs/metrics_test.json", "o:logs/predictions_test.json"],
    "06": ["o:plots/training_summary.png", "o:plots/gallery_test.png", "o:plots/attention_example.png"],
}

# How to continue a stage rather than re-run it, added to an interrupted stage's message.
CONTINUE_HINTS = {
    "04": "to continue training from checkpoints/last instead, run `python -m medexgen_lib "
          "train --resume` with the same -p settings, then `run --from 05`",
}


class StageFailed(RuntimeError):
    """A notebook stage raised; the message names the notebook, cell and error."""


class StageInterrupted(StageFailed):
    """Ctrl-C (SIGINT) or SIGTERM stopped a stage; the message says how to resume."""


@dataclass
class StageResult:
    stage: str
    notebook: str
    status: str
    seconds: float
    executed_copy: str
    outputs: list[str] = field(default_factory=list)
    error: str = ""


def list_stages(notebooks_dir: Path = NOTEBOOKS_DIR) -> dict[str, Path]:
    """Stage number ('01') -> notebook path, for every numbered notebook."""
    stages = {}
    for path in sorted(notebooks_dir.glob("*.ipynb")):
        match = STAGE_NAME.match(path.name)
        if match:
            stages[match.group(1)] = path
    return stages


def run_pipeline(profile: str = "demo", overrides: dict[str, Any] | None = None,
                 start: str | None = None, stop: str | None = None,
                 notebooks_dir: Path = NOTEBOOKS_DIR) -> list[StageResult]:
    """Execute stages ``start``..``stop`` (inclusive) and write a JSON summary.

    Each executed copy is saved to ``logs/notebooks/``. The first failing stage
    stops the run with ``StageFailed``; Ctrl-C or SIGTERM interrupt the running stage
    (``StageInterrupted``). Earlier stages' outputs stay as they are. The run holds the output
    and data folders' locks (``locks.folder_lock``; its stages' kernels share them): a second run
    into either stops with ``FolderInUse`` naming this one's process.
    """
    cfg = load_config(profile, overrides)  # fail on bad keys before any stage runs
    # Folders resolved once, here (against this process's folder): the stages' kernels run in
    # notebooks/ and would resolve relative ones, or the defaults, against that.
    overrides = {**(overrides or {}), "paths.data_dir": cfg.paths.data_dir,
                 "paths.output_dir": cfg.paths.output_dir}
    stages = list_stages(notebooks_dir)
    if not stages:
        raise FileNotFoundError(f"no numbered notebooks in {notebooks_dir}")
    for bound in (start, stop):
        if bound is not None and bound not in stages:
            raise ValueError(f"no stage {bound!r}; stages are {', '.join(stages)}")
    selected = [s for s in stages if (start is None or s >= start) and (stop is None or s <= stop)]
    if "04" in selected:  # a tracker typo fails now, not after acquisition and preprocessing
        resolve_log_with(cfg.train.log_with)
    with folder_lock(cfg.paths.output_dir), folder_lock(cfg.paths.data_dir, "paths.data_dir"), \
            _quiet_papermill():
        out_dir = cfg.paths.logs / "notebooks"
        out_dir.mkdir(parents=True, exist_ok=True)
        results: list[StageResult] = []
        summary_path = cfg.paths.logs / "run_summary.json"
        with _recording_signals() as received:
            for stage in selected:
                if received:  # a signal came as the previous stage finished
                    raise StageInterrupted(f"interrupted before stage {stage}; earlier stages' outputs "
                                           f"are kept. Rerun with --from {stage}")
                results.append(_run_stage(stage, stages[stage], profile, overrides, cfg, out_dir, received))
                _write_summary(summary_path, profile, results)
                if results[-1].status != "ok":
                    exc_type = StageInterrupted if results[-1].status == "interrupted" else StageFailed
                    raise exc_type(results[-1].error)
        return results


def _run_stage(stage: str, notebook: Path, profile: str, overrides: dict, cfg, out_dir: Path,
               received: list[int]) -> StageResult:
    """Execute one notebook; its result says ok, failed or interrupted (with a short message)."""
    import papermill  # imported here: it is slow to import and only the runner needs it

    executed = out_dir / notebook.name
    log.info("stage %s: %s", stage, notebook.name)
    began = time.perf_counter()
    progress = StageProgress(stage, log)  # progress lines and warnings to the terminal, not all output
    # "immediate": once the last cell is done the kernel is stopped without its ~1.5 s graceful
    # shutdown (a kernel that imported torch is slow to exit); every output is written by then.
    try:
        _execute_interruptibly(received, input_path=str(notebook), output_path=str(executed),
                               parameters={"profile": profile, "overrides": overrides},
                               cwd=str(notebook.parent), kernel_name="python3", progress_bar=False,
                               stderr_file=progress, shutdown_kernel="immediate")
    except _UserInterrupt as exc:
        return StageResult(stage, notebook.name, "interrupted", time.perf_counter() - began,
                           str(executed), error=(
                               f"stage {stage} ({notebook.name}) interrupted {exc.where}; "
                               f"earlier stages' outputs are kept. Executed copy: {executed}. "
                               f"Rerun with --from {stage}"
                               + (f"; {CONTINUE_HINTS[stage]}" if stage in CONTINUE_HINTS else "")))
    except papermill.PapermillExecutionError as exc:
        progress.close()
        return StageResult(stage, notebook.name, "failed", time.perf_counter() - began,
                           str(executed), error=(
                               f"stage {stage} ({notebook.name}) failed in cell {exc.cell_index} "
                               f"(execution count {exc.exec_count}): {exc.ename}: {exc.evalue}. "
                               f"Executed copy: {executed}. Fix it and rerun with --from {stage}"))
    progress.close()
    outputs = [str(_output_path(cfg, o)) for o in STAGE_OUTPUTS.get(stage, [])
               if _output_path(cfg, o).exists()]
    return StageResult(stage, notebook.name, "ok", time.perf_counter() - began, str(executed), outputs)


@contextlib.contextmanager
def _quiet_papermill() -> Iterator[None]:
    """papermill's INFO lines (input and output notebook, working directory, kernel) stay off the
    terminal while the stages run; its warnings and errors still show. Its logger's level is put
    back afterwards."""
    logger = logging.getLogger("papermill")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _recording_signals():
    """While the stages run, SIGINT and SIGTERM are recorded in the yielded list instead
    of raising at whatever line happens to run (only possible in the main thread)."""
    received: list[int] = []
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {signum: signal.signal(signum, lambda signum, frame: received.append(signum))
                    for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def _execute_interruptibly(received: list[int], **papermill_args) -> None:
    """``papermill.execute_notebook`` in a worker thread, while this (main) thread watches
    ``received`` (see ``_recording_signals``): the first signal interrupts the running cell
    as JupyterLab's stop button does; a second one, or a cell still running ``KILL_AFTER_S``
    later, kills the kernel. Run in the main thread, nbclient swallows SIGINT and the stage
    carries on; its kernel lives in its own session, so a terminal's Ctrl-C never reaches it.
    """
    import papermill
    from jupyter_client import AsyncKernelManager

    kernels: list[AsyncKernelManager] = []

    class TrackedKernelManager(AsyncKernelManager):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs, **_encrypted_transport())
            kernels.append(self)

    outcome: list[BaseException] = []
    done = threading.Event()

    def work() -> None:
        try:
            papermill.execute_notebook(**papermill_args, kernel_manager_class=TrackedKernelManager)
        except BaseException as exc:  # handed to the main thread
            outcome.append(exc)
        finally:
            done.set()

    threading.Thread(target=work, name="papermill", daemon=True).start()
    before = handled = len(received)
    first_signal_at = None
    while not done.wait(0.2):
        if len(received) > handled:
            handled = len(received)
            first_signal_at = first_signal_at or time.monotonic()
            _signal_kernels(kernels, signal.SIGINT if handled == before + 1 else signal.SIGKILL)
        elif first_signal_at and time.monotonic() - first_signal_at > KILL_AFTER_S:
            _signal_kernels(kernels, signal.SIGKILL)
    if outcome and len(received) > before:
        cell = getattr(outcome[0], "cell_index", None)
        raise _UserInterrupt(f"in cell {cell}" if cell is not None else "(its kernel was killed)")
    if outcome:
        raise outcome[0]


def _encrypted_transport() -> dict:
    """Kernel manager settings for CurveZMQ-encrypted kernel sockets where pyzmq has Curve
    (its wheels do), so ipykernel has no "running over TCP without encryption" warning to print.
    Without Curve the kernel stays on plain local TCP and prints the warning once per stage."""
    import zmq

    return {"transport_encryption": "auto"} if zmq.has("curve") else {}


def _signal_kernels(kernels, signum: int) -> None:
    """Send ``signum`` to every kernel process of the stage that is still running."""
    for manager in kernels:
        process = getattr(manager.provisioner, "process", None)
        if process is not None and process.poll() is None:
            process.send_signal(signum)


class _UserInterrupt(Exception):
    """The runner received Ctrl-C or SIGTERM while a stage ran."""

    def __init__(self, where: str):
        super().__init__(f"interrupted {where}")
        self.where = where


def format_summary(results: list[StageResult]) -> str:
    """A plain-text table of stages, status, wall time and main outputs."""
    lines = [f"{'stage':<6}{'notebook':<26}{'status':<8}{'seconds':>8}  main outputs"]
    lines += [f"{r.stage:<6}{r.notebook:<26}{r.status:<8}{r.seconds:>8.1f}  "
              f"{', '.join(Path(o).name for o in r.outputs)}" for r in results]
    lines.append(f"{'':<6}{'total':<26}{'':<8}{sum(r.seconds for r in results):>8.1f}")
    return "\n".join(lines)


def _output_path(cfg, spec: str) -> Path:
    root, relative = spec.split(":", 1)
    return Path(cfg.paths.data_dir if root == "d" else cfg.paths.output_dir) / relative


def _write_summary(path: Path, profile: str, results: list[StageResult]) -> None:
    write_json(path, {"profile": profile, "stages": [asdict(r) for r in results]})
