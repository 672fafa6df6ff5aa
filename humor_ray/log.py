"""One log for every stage, on the standard `logging` module.

Each stage logs through `get_logger("sft")` (a child of the `humor_ray` logger); `setup_logging`
installs the one format, `[  12.3 s sft] message` (seconds since the process started, the stage),
on standard error at the level the user asked for (`--log_level`).
"""

from __future__ import annotations

import logging
import os
import sys
import time

ROOT = "humor_ray"
LEVEL_VARIABLE = "HUMOR_RAY_LOG_LEVEL"  # carries the driver's level to Ray workers
_STARTED = time.monotonic()


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        elapsed = time.monotonic() - _STARTED
        stage = record.name[len(ROOT) + 1:] if record.name.startswith(ROOT + ".") else record.name
        level = "" if record.levelno == logging.INFO else f"{record.levelname}: "
        text = f"[{elapsed:7.1f} s {stage}] {level}{record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def get_logger(stage: str) -> logging.Logger:
    """The logger of a stage ("sft", "data build", "ppo worker 1"): its name is shown on each line."""
    return logging.getLogger(f"{ROOT}.{stage}")


def setup_logging(level: str | int | None = None) -> None:
    """Our lines on standard error at `level` (default: $HUMOR_RAY_LOG_LEVEL, else INFO); idempotent,
    called by the CLI and at the start of each Ray worker."""
    level = level or os.environ.get(LEVEL_VARIABLE) or "INFO"
    logger = logging.getLogger(ROOT)
    logger.setLevel(level.upper() if isinstance(level, str) else level)
    if not any(getattr(handler, "_humor_ray", False) for handler in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_Format())
        handler._humor_ray = True
        logger.addHandler(handler)
    logger.propagate = False
