"""Rich progress bars for long work, one style everywhere; where the output is not a terminal (a log file, CI,
a pipe), plain progress lines instead, so a long run is never silent for minutes."""

from __future__ import annotations

import sys
import time

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class RateColumn(ProgressColumn):
    def __init__(self, unit: str = "it"):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        return Text(f"{task.speed:.1f} {self.unit}/s" if task.speed else "")


class LoggedProgress(Progress):
    """Rich's live bars on a terminal; elsewhere one line per task on stderr every `every` seconds and when it
    finishes ("1/4 analyze (calibration): 16/32 ex, 41 s")."""

    def __init__(self, *columns, unit: str = "it", every: float = 10.0, **kwargs):
        super().__init__(*columns, **kwargs)
        self.unit, self.every = unit, every
        self._logged: dict = {}

    def advance(self, task_id, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._log(task_id)

    def update(self, task_id, **kwargs) -> None:
        super().update(task_id, **kwargs)
        self._log(task_id)

    def _log(self, task_id) -> None:
        if self.console.is_terminal:
            return
        task = self._tasks[task_id]
        now = time.monotonic()
        finished = task.total is not None and task.completed >= task.total
        if finished and self._logged.get(task_id) == "finished":
            return
        if finished or now - self._logged.get(task_id, float("-inf")) >= self.every:
            self._logged[task_id] = "finished" if finished else now
            total = "" if task.total is None else f"/{task.total:g}"
            print(f"{task.description}: {task.completed:g}{total} {self.unit}, {task.elapsed or 0:.0f} s",
                  file=sys.stderr, flush=True)


def progress(unit: str = "it", console=None) -> Progress:
    return LoggedProgress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        unit=unit,
        console=console,
    )
