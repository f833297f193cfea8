"""Logging on stderr, one line per event, with each phase's duration."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

START = time.monotonic()
PROG = "mlserver-entrypoint"


def info(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def elapsed_ms() -> float:
    return (time.monotonic() - START) * 1000


@contextmanager
def phase(name: str, details: dict[str, object] | None = None) -> Iterator[dict[str, object]]:
    """Log `name: <seconds>` when the block ends; the block may add details to the dict it gets."""
    extra: dict[str, object] = details if details is not None else {}
    t0 = time.monotonic()
    yield extra
    took = time.monotonic() - t0
    tail = "".join(f", {k} {v}" for k, v in extra.items())
    info(f"{name}: {took * 1000:.0f} ms{tail}" if took < 1 else f"{name}: {took:.2f} s{tail}")
