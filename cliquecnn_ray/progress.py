"""Progress of the long stages (training steps, imputation, neighbour tiles): a bar on a terminal, plain
log lines elsewhere (a file, a pipe, CI), never both.

Bars are drawn by the driver only (neighbour tiles; imputation shows Ray Data's own); a Ray Train worker
logs its steps as lines, which Ray forwards to the driver's console (``ray.experimental.tqdm_ray`` printed
blank prefixed lines there instead of a bar).
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Optional

LOG_EVERY = 0.1  # without a bar: a log line each time another tenth of the work is done


def on_terminal() -> bool:
    """Whether this process's console is an interactive terminal (bars) rather than a file or CI (lines)."""
    return sys.stderr.isatty() and os.environ.get("TERM") != "dumb" and not os.environ.get("CI")


class Progress:
    """Counts work done towards ``total`` and shows it: a tqdm bar when ``bar``, else a log line on
    ``logger`` per tenth of the work (and at the end). A context manager; ``close`` ends the bar."""

    def __init__(self, desc: str, total: int, logger: logging.Logger, unit: str = "", bar: Optional[bool] = None):
        self.desc, self.total, self.unit, self.log = desc, max(0, int(total)), unit, logger
        self.done = 0
        self._next_line = LOG_EVERY * self.total
        self._bar = None
        if (on_terminal() if bar is None else bar) and self.total:
            from tqdm import tqdm

            self._bar = tqdm(desc=desc, total=self.total, unit=unit or "it")

    def update(self, n: int = 1, note: str = "") -> None:
        """``n`` more units done; ``note`` (e.g. the current loss) goes into the log line."""
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.done >= self._next_line and self.total:
            self.log.info("%s: %d/%d%s (%d%%)%s", self.desc, self.done, self.total, f" {self.unit}" * bool(self.unit),
                          100 * self.done // self.total, f", {note}" if note else "")
            while self._next_line <= self.done:
                self._next_line += LOG_EVERY * self.total

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
