"""Logging set-up: one line per event, no patient identifiers at INFO."""

from __future__ import annotations

import logging
import sys


def setup_logging(level: str = "INFO") -> None:
    """Log to stderr at ``level`` (``logging.level``); called again, only the level changes."""
    root = logging.getLogger()
    if getattr(root, "_msknode_configured", False):
        root.setLevel(level.upper())
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root._msknode_configured = True  # type: ignore[attr-defined]
    # pynetdicom logs every dataset's identifiers and PDU contents at INFO/DEBUG; keep it to warnings.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
