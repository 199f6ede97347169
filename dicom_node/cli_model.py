"""Model commands: ``infer`` and ``model pretrain|fit-heads|evaluate`` (issue 3 fills these in)."""

from __future__ import annotations


def register(sub) -> None:
    """Add the model subcommands to the ``dicom-node`` parser."""
