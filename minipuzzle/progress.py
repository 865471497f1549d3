"""Progress bars: every stage's bar is a rich bar on stderr (stdout carries results, e.g. `--json`), or nothing.

`ProgressBar` is the bar; `progress_bar` yields its `advance` for code that counts work done, `track` wraps an
iterable. rich is imported only when a bar is shown.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")


class ProgressBar:
    """One bar: description, bar, done/total, optional `status` line, elapsed and remaining time.

    `status` is a rich template over the task's fields (`"loss {task.fields[loss]}"`), whose first values come as
    keyword arguments and later ones through `update`. Disabled, every method does nothing.
    """

    def __init__(self, description: str, total: int, enabled: bool = True, *, completed: int = 0,
                 status: str | None = None, transient: bool = False, **fields: Any) -> None:  # fmt: skip
        self._bar = None
        if not enabled:
            return

        cols = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
        cols += [TextColumn(status)] if status else []
        cols += [TimeElapsedColumn(), TimeRemainingColumn()]
        self._bar = Progress(*cols, console=Console(stderr=True), transient=transient)
        self._bar.start()
        self._task = self._bar.add_task(description, total=total, completed=completed, **fields)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, n)

    def update(self, completed: int | None = None, **fields: Any) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=completed, **fields)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextmanager
def progress_bar(description: str, total: int, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """A bar for `total` units of work; yields `advance(n=1)`."""
    with ProgressBar(description, total, enabled) as bar:
        yield bar.advance


def track(items: Iterable[T], description: str, enabled: bool = True, *, transient: bool = False) -> Iterator[T]:
    """Yield `items` while a bar counts them (`items` needs a length)."""
    items = list(items) if not hasattr(items, "__len__") else items
    with ProgressBar(description, len(items), enabled, transient=transient) as bar:
        for x in items:
            yield x
            bar.advance()
