"""Progress callbacks that drive a rich progress bar from the core's ``on_step`` hooks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from offsite.cli.ui import progress


class StepBar:
    """``bar(step, value)`` advances to ``step`` and shows ``value``; ``set_total`` once known."""

    def __init__(self, bar, task, metric: str):
        self._bar, self._task, self._metric = bar, task, metric

    def __call__(self, step: int, value: float) -> None:
        self._bar.update(self._task, completed=step, status=f"{self._metric} {value:.4f}")

    def set_total(self, total: int) -> None:
        self._bar.update(self._task, total=total)


@contextlib.contextmanager
def step_bar(description: str, total: int | None = None, metric: str = "loss") -> Iterator[StepBar]:
    with progress() as bar:
        yield StepBar(bar, bar.add_task(description, total=total, status=""), metric)
