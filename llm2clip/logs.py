"""Readable logs: expected library messages dropped, progress bars only on a terminal.

`setup_logging()` runs once at the start of every `llm2clip` and `mllm` command. It drops, by logger and
message, what each run printed although nothing was wrong, and turns transformers' own progress bars off
when stderr is not a terminal (a log file or a pipe would collect every carriage-return frame). Our tqdm
bars pass `disable=None` (tqdm's own terminal check), and the Trainer gets `disable_tqdm` from
`progress_bars()`, so a logged run prints one line per `logging_steps` instead of a bar.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from transformers.utils import logging as hf_logging

# (logger name, start of the message) of what is expected and needs no action.
EXPECTED = (
    # DeepSpeed, on every machine without CUDA, when anything first asks for its accelerator.
    ("DeepSpeed", "Setting accelerator to CPU"),
)


class _DropExpected(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def progress_bars() -> bool:
    """Whether progress bars can redraw in place: stderr, where tqdm writes, is a terminal."""
    return sys.stderr.isatty()


def setup_logging() -> None:
    """Drop the EXPECTED messages and, off a terminal, transformers' progress bars. Safe to call again."""
    for name, prefix in EXPECTED:
        logger = logging.getLogger(name)  # the library configures this same logger when it loads
        if not any(isinstance(f, _DropExpected) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropExpected(prefix))
    if not progress_bars():
        hf_logging.disable_progress_bar()  # "Loading weights", "Writing model shards"


@contextmanager
def transformers_errors_only() -> Iterator[None]:
    """Silence transformers' warnings (such as load reports) for the duration of the block."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
