"""Progress callbacks that drive a rich progress bar from the core's ``on_step`` hooks."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from offsite.cli.ui import progress


@contextlib.contextmanager
def step_bar(description: str, total: int | None, metric: str = "loss") -> Iterator[Callable[[int, float], None]]:
    """Yield ``on_step(step, value)`` that advances a bar to ``step`` of ``total`` and shows ``value``."""
    with progress() as bar:
        task = bar.add_task(description, total=total, status="")

        def on_step(step: int, value: float) -> None:
            bar.update(task, completed=step, status=f"{metric} {value:.4f}")

        yield on_step
