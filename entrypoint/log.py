"""Logging on stderr, one line per event, with each phase's duration."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from entrypoint.errors import EntrypointError, OutputError

T = TypeVar("T")
START = time.monotonic()
PROG = "mlserver-entrypoint"


# Control characters (from member names, paths) escaped: a log line stays one line, and a hostile
# name cannot forge a line or send a terminal escape sequence.
ESCAPE = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)}


def info(message: str) -> None:
    """One line, in one write with its newline: a server logging on the same stderr meanwhile
    cannot glue its line to ours."""
    _stderr(f"{PROG}: {message.translate(ESCAPE)}\n")


def _stderr(text: str) -> None:
    """Written straight to fd 2: a log that cannot be written (closed, a pipe whose reader left)
    is lost, and stops nothing."""
    with contextlib.suppress(OSError):
        os.write(2, text.encode("utf-8", "backslashreplace"))


def error(exc: EntrypointError, debug: bool) -> None:
    """The one error line; with MLSERVER_ENV_DEBUG, the traceback behind it too."""
    info(f"error: {exc.line}")
    if debug:
        import traceback

        _stderr(exc.trace or "".join(traceback.format_exception(exc)))


def out(text: str) -> None:
    """A line of output on stdout, flushed; a closed or failing stdout is one error line, not a
    traceback nor a silent success."""
    if sys.stdout is None:
        raise OutputError("standard output is closed, so this output is lost", "run it with stdout open")
    try:
        print(text, flush=True)
    except BrokenPipeError:
        raise  # the reader had enough: the CLI ends quietly, as a tool killed by SIGPIPE would
    except OSError as exc:
        silence_stdout()
        raise OutputError(f"cannot write to standard output: {exc.strerror}", "check where it goes") from exc


def silence_stdout() -> None:
    """Point stdout at /dev/null once it failed, so exit's flush of what is left adds no second complaint."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


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


class Progress:
    """Progress of a long unpack: a redrawn line on a terminal, a line every 10% in plain logs.

    Hand-written: tqdm's carriage-return frames garble container logs. The clock is read every 64
    members only, and an unpack quicker than QUIET_FOR shows nothing.
    """

    QUIET_FOR = 2.0

    def __init__(self, label: str, total: int, position: Callable[[], int]) -> None:
        self._label = label
        self._total = total  # 0: unknown, nothing shown
        self._position = position  # bytes of the archive read so far
        self._tty = os.isatty(2)
        self._count = 0
        self._next_step = 10
        self._start = self._last = time.monotonic()
        self._drawn = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.done()

    def done(self) -> None:
        """Clear a drawn line, so an error line that follows starts its own."""
        if self._drawn:
            _stderr("\r\033[K")
            self._drawn = False

    def through(self, members: Iterable[T]) -> Iterator[T]:
        for m in members:
            self.tick()
            yield m

    def tick(self) -> None:
        self._count += 1
        if self._count & 63:
            return
        now = time.monotonic()
        if now - self._start < self.QUIET_FOR or (self._tty and now - self._last < 0.2) or self._total <= 0:
            return
        # Of the archive read, which runs ahead of the members written: never 100% before the end.
        percent = min(99, self._position() * 100 // self._total)
        if self._tty:
            _stderr(f"\r{PROG}: {self._label}: {percent:3d}% ({self._count} members)")
            self._drawn = True
        elif percent >= self._next_step:
            info(f"{self._label}: {percent}% ({self._count} members)")
            self._next_step = (percent // 10 + 1) * 10
        self._last = now
