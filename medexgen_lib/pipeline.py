"""Run the numbered notebooks headless, in order, with papermill."""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from medexgen_lib.config import load_config
from medexgen_lib.paths import NOTEBOOKS_DIR

log = logging.getLogger(__name__)

STAGE_NAME = re.compile(r"^(\d\d)_\w+\.ipynb$")


class StageFailed(RuntimeError):
    """A notebook stage raised; the message names the notebook, cell and error."""


@dataclass
class StageResult:
    stage: str
    notebook: str
    status: str
    seconds: float
    executed_copy: str
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
    stops the run with ``StageFailed``; earlier stages' outputs stay as they are.
    """
    import papermill  # imported here: it is slow to import and only the runner needs it

    overrides = dict(overrides or {})
    cfg = load_config(profile, overrides)  # fail on bad keys before any stage runs
    stages = list_stages(notebooks_dir)
    if not stages:
        raise FileNotFoundError(f"no numbered notebooks in {notebooks_dir}")
    for bound in (start, stop):
        if bound is not None and bound not in stages:
            raise ValueError(f"no stage {bound!r}; stages are {', '.join(stages)}")
    selected = [s for s in stages if (start is None or s >= start) and (stop is None or s <= stop)]
    out_dir = cfg.paths.logs / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    results: list[StageResult] = []
    summary_path = cfg.paths.logs / "run_summary.json"
    for stage in selected:
        notebook = stages[stage]
        executed = out_dir / notebook.name
        log.info("stage %s: %s", stage, notebook.name)
        began = time.perf_counter()
        try:
            papermill.execute_notebook(
                str(notebook), str(executed), parameters={"profile": profile, "overrides": overrides},
                cwd=str(notebook.parent), kernel_name="python3", progress_bar=False)
        except papermill.PapermillExecutionError as exc:
            message = (f"stage {stage} ({notebook.name}) failed in cell {exc.cell_index} "
                       f"(execution count {exc.exec_count}): {exc.ename}: {exc.evalue}. "
                       f"Executed copy: {executed}. Fix it and rerun with --from {stage}")
            results.append(StageResult(stage, notebook.name, "failed",
                                       time.perf_counter() - began, str(executed), message))
            _write_summary(summary_path, profile, results)
            raise StageFailed(message) from None
        results.append(StageResult(stage, notebook.name, "ok", time.perf_counter() - began,
                                   str(executed)))
        _write_summary(summary_path, profile, results)
    return results


def format_summary(results: list[StageResult]) -> str:
    """A plain-text table of stages, status and wall time."""
    lines = [f"{'stage':<6}{'notebook':<28}{'status':<8}{'seconds':>8}"]
    lines += [f"{r.stage:<6}{r.notebook:<28}{r.status:<8}{r.seconds:>8.1f}" for r in results]
    lines.append(f"{'':<6}{'total':<28}{'':<8}{sum(r.seconds for r in results):>8.1f}")
    return "\n".join(lines)


def _write_summary(path: Path, profile: str, results: list[StageResult]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"profile": profile, "stages": [asdict(r) for r in results]}, indent=2))
    tmp.replace(path)
