"""Progress for people and for logs: a live bar on a terminal; in a log file or a pipe, one plain line per tenth of
the work, and at least one about every minute (a training run bounded by --minutes may never reach a tenth of its
steps), since a live bar there becomes one enormous line of carriage returns; nothing with --quiet."""
from __future__ import annotations

import sys
import time
from typing import Iterable, TextIO

from tqdm import tqdm

QUIET = {"on": False}  # set once per command by `lcs ... --quiet`
EVERY_SECONDS = 60  # a log line at least this often (at the first update after it)


def set_quiet(quiet: bool) -> None:
    QUIET["on"] = bool(quiet)


def progress_bar(iterable: Iterable | None = None, total: int | None = None, desc: str = "", initial: int = 0,
                 disable: bool = False, file: TextIO | None = None):
    """A tqdm-like bar (update, set_postfix, set_description_str, n, refresh, close; iterating wraps `iterable`)."""
    file = file or sys.stderr
    if disable or QUIET["on"]:
        return tqdm(iterable, total=total, disable=True)
    if file.isatty():
        return tqdm(iterable, total=total, desc=desc, initial=initial, file=file, dynamic_ncols=True)
    return LineProgress(iterable, total, desc, initial, file)


class LineProgress:
    """One line each time another tenth of the work is done or EVERY_SECONDS passed, and one at the end: readable in a
    log."""

    def __init__(self, iterable: Iterable | None, total: int | None, desc: str, initial: int, file: TextIO):
        self.iterable, self.desc, self.n, self.file = iterable, desc, initial, file
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.postfix, self.started = "", time.time()
        self.shown, self.printed = self._tenths(), self.started

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update()
        self.close()

    def _tenths(self) -> int:
        return int(10 * self.n / self.total) if self.total else 0

    def update(self, n: int = 1) -> None:
        self.n += n
        self.refresh()

    def refresh(self) -> None:
        if self._tenths() > self.shown or time.time() - self.printed >= EVERY_SECONDS:
            self.shown = self._tenths()
            self._print()

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def set_description_str(self, text: str) -> None:
        self.desc = text.strip()

    def close(self) -> None:
        if self.shown < 10 and self.n and self.n != self.total:  # stopped early (e.g. by --minutes): say where
            self._print()
        self.shown = 10

    def _print(self) -> None:
        done = f"{self.n}/{self.total} ({100 * self.n / self.total:.0f} %)" if self.total else f"{self.n}"
        extra = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {done}, {time.time() - self.started:.0f} s{extra}", file=self.file, flush=True)
        self.printed = time.time()
