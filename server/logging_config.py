"""The "tokmodel" logger tree's one handler, set up once by the CLI: stderr, so that `tokmodel generate` keeps stdout
for the completion; level from TOKMODEL_LOG_LEVEL (default info) or --debug."""
from __future__ import annotations

import logging
import os
import sys

from server.startup import UsageError

LOG_LEVEL_ENV = "TOKMODEL_LOG_LEVEL"
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure_logging(debug: bool) -> int:
    """Installs the handler and returns the level in force."""
    name = "debug" if debug else os.environ.get(LOG_LEVEL_ENV, "info").lower()
    if name not in _LEVELS:
        raise UsageError(f"{LOG_LEVEL_ENV}={name!r} is not one of {', '.join(_LEVELS)}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [%(name)s] %(message)s", "%m-%d %H:%M:%S"))
    logger = logging.getLogger("tokmodel")
    logger.handlers[:] = [handler]
    logger.setLevel(_LEVELS[name])
    logger.propagate = False
    return _LEVELS[name]
