"""One log for every stage, on the standard `logging` module.

Each stage logs through `get_logger("sft")` (a child of the `humor_ray` logger); `setup_logging`
installs the one format, `[  12.3 s sft] message` (seconds since the process started, the stage),
on standard error at the level the user asked for (`--log_level`). The first `get_logger` of a process
sets it up at $HUMOR_RAY_LOG_LEVEL, so Ray workers, which inherit that variable, log the same way.

Ray's and Ray Data's INFO lines (execution plans, progress printed as log lines when the output is not
a terminal, the token-authentication notice at every local start) reach the terminal only at DEBUG;
Ray Data's log file in the session directory keeps them all, and progress bars are not log lines.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from pathlib import Path

ROOT = "humor_ray"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LEVEL_VARIABLE = "HUMOR_RAY_LOG_LEVEL"  # carries the driver's level to Ray workers
# Ray Data reads its logging config from this file (its default, the console at WARNING) when it is imported.
RAY_DATA_CONFIG_VARIABLE = "RAY_DATA_LOGGING_CONFIG"
RAY_DATA_QUIET = str(Path(__file__).with_name("ray_data_logging.yaml"))
RAY_TOKEN_NOTICE = "ray._private.authentication.authentication_token_setup"
_STARTED = time.monotonic()

# Credentials a storage URI may carry (`s3://KEY:SECRET@bucket/...`, `?secret_key=...&session_token=...`).
# The user part has no '/', the secret after ':' may (an AWS secret key often has one, left unquoted).
_URI_USERINFO = re.compile(r"(\b[a-z][a-z0-9+.-]*://)(?:[^/@\s:]*@|[^/@\s:]*:[^@\s]*?@)", re.IGNORECASE)
_SECRET_PARAMETER = re.compile(r"([?&][a-z_]*(?:secret|token|password|passwd|credential|access_key|signature|"
                               r"api_key|apikey|auth)[a-z_]*=)[^&\s'\"]*", re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with the credentials of any URI in it replaced by `***`: for every log line, error line and
    record a run writes."""
    return _SECRET_PARAMETER.sub(r"\1***", _URI_USERINFO.sub(r"\1***@", text))


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        elapsed = time.monotonic() - _STARTED
        stage = record.name[len(ROOT) + 1:] if record.name.startswith(ROOT + ".") else record.name
        level = "" if record.levelno == logging.INFO else f"{record.levelname}: "
        text = f"[{elapsed:7.1f} s {stage}] {level}{record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return redact(text)


class _Stderr(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a line is logged (test captures and Ray swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def get_logger(stage: str) -> logging.Logger:
    """The logger of a stage ("sft", "data build", "ppo worker 1"): its name is shown on each line."""
    if not _installed():
        setup_logging()
    return logging.getLogger(f"{ROOT}.{stage}")


def _installed() -> bool:
    return any(isinstance(handler, _Stderr) for handler in logging.getLogger(ROOT).handlers)


def setup_logging(level: str | int | None = None) -> None:
    """Our lines on standard error at `level` (default: $HUMOR_RAY_LOG_LEVEL, else INFO); idempotent.
    The config system calls it with `--log_level`; a process's first `get_logger` calls it too."""
    level = level or os.environ.get(LEVEL_VARIABLE) or "INFO"
    logger = logging.getLogger(ROOT)
    logger.setLevel(level.upper() if isinstance(level, str) else level)
    if not _installed():
        handler = _Stderr()
        handler.setFormatter(_Format())
        logger.addHandler(handler)
    logger.propagate = False
    _quiet_ray(logger.getEffectiveLevel() > logging.DEBUG)


def _quiet_ray(quiet: bool) -> None:
    """Ray's INFO lines off the terminal unless we log at DEBUG (see the module docstring)."""
    if quiet:
        os.environ.setdefault(RAY_DATA_CONFIG_VARIABLE, RAY_DATA_QUIET)
    elif os.environ.get(RAY_DATA_CONFIG_VARIABLE) == RAY_DATA_QUIET:
        del os.environ[RAY_DATA_CONFIG_VARIABLE]
    logging.getLogger(RAY_TOKEN_NOTICE).setLevel(logging.ERROR if quiet else logging.NOTSET)


def ray_level() -> int:
    """The level of Ray's own logger in the driver: its INFO lines only when we log at DEBUG."""
    return logging.INFO if logging.getLogger(ROOT).getEffectiveLevel() <= logging.DEBUG else logging.WARNING
