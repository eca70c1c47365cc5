"""<run>/train.log: everything the run printed, so a finished run can be read without its terminal.

The terminal shows what a user needs (what runs, progress bars, the trainable-parameter line, where the
artifacts are, the metrics table). Libraries' info lines (Lightning's device and seed lines and tips,
transformers' load reports, Python warnings) go to train.log only. Progress-bar redraws go nowhere near it.
"""

from __future__ import annotations

import io
import logging
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from transformers.utils import logging as hf_logging

from toolkit.console import console

# Loggers whose records are kept out of the terminal: they go to train.log alone.
LIBRARY_LOGGERS = (
    "lightning.pytorch",
    "lightning.fabric",
    "transformers",
    "torch",
    "deepspeed",
    "py.warnings",
    "toolkit.ranks",  # each rank's host (training.callbacks.RankPlacement)
)
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Tee(io.TextIOBase):
    """The terminal stream, with every complete write also appended (without colour codes) to the log."""

    def __init__(self, stream: TextIO, log: TextIO) -> None:
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        self.stream.write(text)
        if "\r" not in text:  # a carriage return redraws a line in place: a progress bar, not a record
            self.log.write(ANSI.sub("", text))
        return len(text)

    def flush(self) -> None:
        self.stream.flush()
        self.log.flush()

    def isatty(self) -> bool:  # rich decides colours and live redraws from the terminal, not from the log
        return self.stream.isatty()


class PlainFormatter(logging.Formatter):
    """Log records without terminal colour codes (transformers colours its load report)."""

    def format(self, record: logging.LogRecord) -> str:
        return ANSI.sub("", super().format(record))


@contextmanager
def train_log(path: Path) -> Iterator[None]:
    """Copy the toolkit's console output to `path` and send the libraries' log records there only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8", buffering=1) as log:
        handler = logging.StreamHandler(log)
        handler.setFormatter(PlainFormatter("[%(asctime)s][%(name)s][%(levelname)s] %(message)s"))
        saved = {name: _route(logging.getLogger(name), handler) for name in LIBRARY_LOGGERS}
        logging.captureWarnings(True)  # warnings.warn -> the py.warnings logger -> train.log
        console.file = Tee(sys.stdout, log)
        hf_logging.disable_progress_bar()  # weight-loading bars, redrawn per shard
        try:
            yield
        finally:
            hf_logging.enable_progress_bar()
            console.file = None  # back to whatever sys.stdout is then
            logging.captureWarnings(False)
            for name, (handlers, propagate) in saved.items():
                logger = logging.getLogger(name)
                logger.handlers, logger.propagate = handlers, propagate


def _route(logger: logging.Logger, handler: logging.Handler) -> tuple[list[logging.Handler], bool]:
    saved = (logger.handlers[:], logger.propagate)
    logger.handlers, logger.propagate = [handler], False
    return saved
