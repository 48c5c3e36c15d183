"""The one logger: `from raytrain.log import log`, then `log.info("...")`.

Lines read `raytrain: <message>`: INFO and DEBUG on stdout, WARNING and above on stderr.
On a distributed run only rank 0 logs below WARNING (eight workers would otherwise print
every line eight times); other ranks' warnings carry their rank. The level is
`RAYTRAIN_LOG_LEVEL` (default INFO), or `run.log_level` once a config calls `set_level`.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("raytrain")


def rank() -> int:
    """This process's rank: torch.distributed's once initialized, else Ray Train's RANK variable."""
    dist = sys.modules.get("torch.distributed")  # never import torch just to log
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


class _Console(logging.Handler):
    """stdout or stderr as they are when a line is written (pytest and Ray swap them)."""

    def emit(self, record: logging.LogRecord) -> None:
        r = rank()
        if r != 0 and record.levelno < logging.WARNING:
            return
        stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
        prefix = "raytrain" if r == 0 else f"raytrain[rank {r}]"
        try:
            stream.write(f"{prefix}: {record.getMessage()}\n")
            stream.flush()
        except Exception:  # noqa: BLE001  (logging must never break the run)
            self.handleError(record)


def set_level(level: str | int) -> None:
    log.setLevel(level.upper() if isinstance(level, str) else level)


if not log.handlers:
    log.addHandler(_Console())
    log.propagate = False  # one line per message, whatever the root logger does
    set_level(os.environ.get("RAYTRAIN_LOG_LEVEL", "INFO"))
