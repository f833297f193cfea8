"""Logging on stderr, one line per event, with each phase's duration."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from entrypoint.errors import OutputError

START = time.monotonic()
PROG = "mlserver-entrypoint"


# Control characters (from member names, paths) escaped: a log line stays one line, and a hostile
# name cannot forge a line or send a terminal escape sequence.
ESCAPE = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)}


def info(message: str) -> None:
    # One write with its newline: print() writes the newline separately, which under
    # PYTHONUNBUFFERED (the image sets it) is a second write(2), and a server logging on the same
    # stderr at that moment got its line glued to ours.
    sys.stderr.write(f"{PROG}: {message.translate(ESCAPE)}\n")
    sys.stderr.flush()


def out(text: str) -> None:
    """A line of the command's output on stdout, flushed. Written to a full disk (`unpack > file`)
    it failed with an OSError traceback: one line instead, and nothing left for exit's flush.
    Closed (`unpack >&-`: Python sets sys.stdout to None) it was lost without a word, and exit 0."""
    if sys.stdout is None:
        raise OutputError("standard output is closed, so this output is lost; run it with stdout open")
    try:
        print(text, flush=True)
    except BrokenPipeError:
        raise  # the reader had enough: cli ends quietly, as a tool killed by SIGPIPE would
    except OSError as exc:
        silence_stdout()
        raise OutputError(f"cannot write to standard output: {exc.strerror}; check where it goes") from None


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
    """Progress of a long unpack: a redrawn line on a terminal, a plain line every 10% in logs.

    Hand-written (tqdm's carriage-return frames garble container logs, and a plain log wants one
    line per step, not a bar); it checks the clock only every 64 members, so it costs nothing.
    """

    QUIET_FOR = 2.0  # seconds: a quick unpack shows no progress at all

    def __init__(self, label: str, total: int, position: Callable[[], int]) -> None:
        self._label = label
        self._total = max(total, 1)
        self._position = position
        self._tty = sys.stderr.isatty()
        self._count = 0
        self._next_step = 10
        self._start = self._last = time.monotonic()
        self._drawn = False

    def tick(self) -> None:
        self._count += 1
        if self._count & 63:
            return
        now = time.monotonic()
        if now - self._start < self.QUIET_FOR or (self._tty and now - self._last < 0.2):
            return  # quick unpacks stay quiet
        # Of the archive read: the decompressing thread reads ahead of the members written, so 100%
        # came while hundreds were still to go. The count is of members (files, directories,
        # symlinks); the phase's own line ends with the files written.
        percent = min(99, self._position() * 100 // self._total)
        if self._tty:
            print(
                f"\r{PROG}: {self._label}: {percent:3d}% ({self._count} members)", end="", file=sys.stderr, flush=True
            )
            self._drawn = True
        elif percent >= self._next_step:
            info(f"{self._label}: {percent}% ({self._count} members)")
            self._next_step = (percent // 10 + 1) * 10
        self._last = now

    def done(self) -> None:
        if self._drawn:
            print("\r\033[K", end="", file=sys.stderr, flush=True)
            self._drawn = False
