"""Logging set-up: one line per event, no patient identifiers at INFO."""

from __future__ import annotations

import logging
import re
import sys

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_TAG = re.compile(r"\(\s*([0-9A-Fa-f]{4})\s*,\s*([0-9A-Fa-f]{4})\s*\)")


def escape_controls(text: str) -> str:
    """Control characters (a peer's UIDs or AE titles may carry them) as ``\\xNN``: one event, one line."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def describe_error(exc: BaseException) -> str:
    """An error of a decoder or of pydicom as its type and, when its text names one, the tag: never the
    text itself, which may quote a data element's value (a patient's name)."""
    m = _TAG.search(str(exc))
    where = f" at tag ({m.group(1).upper()},{m.group(2).upper()})" if m else ""
    return f"{type(exc).__name__}{where}"


class SafeFormatter(logging.Formatter):
    """Escapes control characters in every message (tracebacks, which the node logs only for
    unexpected errors, keep their lines)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape_controls(super().formatMessage(record))


def setup_logging(level: str = "INFO") -> None:
    """Log to stderr at ``level`` (``logging.level``); called again, only the level changes."""
    root = logging.getLogger()
    if getattr(root, "_msknode_configured", False):
        root.setLevel(level.upper())
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(SafeFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root._msknode_configured = True  # type: ignore[attr-defined]
    # pynetdicom logs every dataset's identifiers and PDU contents at INFO/DEBUG; keep it to warnings.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
