"""Where the repository is: the worker runs as ``python -m worker`` from here."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
