"""One exception family, so the CLI can print every failure as one line with a fitting exit code."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from types import FrameType
from typing import ClassVar


class EntrypointError(Exception):
    """A failure the user can act on; its message says what is wrong and what to do."""

    exit_code = 1


class ConfigError(EntrypointError):
    """A setting is wrong (missing tarball, unwritable cache, bad pin)."""

    exit_code = 2


class ArchiveError(EntrypointError):
    """The tarball is unreadable, corrupt, hostile or over a limit; nothing was cached."""

    exit_code = 3


ARCHIVE_ADVICE = "pack the environment again with conda-pack (this archive is damaged, or not one it writes)"


# How the advice at the end of a message begins ("…; pack it again", "…; raise MLSERVER_ENV_…").
ADVICE_VERBS = frozenset({
    "pack", "point", "check", "raise", "use", "start", "set", "run", "remove", "give", "fix", "add",
    "mount", "unset", "put", "make", "free", "download", "copy", "update", "ask", "try", "get",
})  # fmt: skip


def error_line(exc: EntrypointError) -> str:
    """What the one error line says. The extractor's and the tar reader's refusals name what is
    wrong with a member ("member ../x: '..' in path"); what to do is the same for all of them, so
    it is added here to every archive error whose last "; " part gives no advice of its own (a
    member's name may hold "; " too: it is not advice)."""
    text = str(exc)
    if isinstance(exc, ArchiveError) and text.rpartition("; ")[2].split(" ", 1)[0] not in ADVICE_VERBS:
        return f"{text}; {ARCHIVE_ADVICE}"
    return text


class EnvError(EntrypointError):
    """The unpacked environment cannot run here (no interpreter, wrong platform, no mlserver)."""

    exit_code = 4


class OutputError(EntrypointError):
    """stdout cannot be written (a full disk under `unpack > file`): the output is lost."""


class CommandNotFound(EntrypointError):
    """The command to run is on no PATH: 127, as a shell and `docker run` report it."""

    exit_code = 127


class CommandNotRunnable(EntrypointError):
    """The command names a file that cannot be run (no execute bit, a directory): 126, as a shell says."""

    exit_code = 126


class StopSignal(EntrypointError):
    """Raised by a stop signal's handler. Python prints and drops an exception raised inside a
    weakref callback or a __del__ (seen: WeakSet._remove and an import lock's callback during
    relocation, after which the start went on as if never stopped), so the handler also records
    its signal and the start checks for it at its next step (`honour`); cli's unraisable hook
    keeps the dropped one off stderr."""

    caught: ClassVar[list[int]] = []  # every stop signal a handler took, in this process
    deferring: ClassVar[int] = 0  # inside `deferred()`: a stop is recorded, raised when it ends
    message = "stopped by {signal}"

    def __init__(self, signum: int) -> None:
        super().__init__(self.message.format(signal=signal.Signals(signum).name))
        self.exit_code = 128 + signum  # as a shell reports a command the signal ended: 143, 130

    @classmethod
    def handler(cls, signum: int, frame: FrameType | None) -> None:
        StopSignal.caught.append(signum)
        if not StopSignal.deferring:
            raise cls(signum)

    @staticmethod
    @contextlib.contextmanager
    def deferred() -> Iterator[None]:
        """A stop during the block is delivered again when it ends: for a step that must not be cut
        half way, e.g. subprocess.Popen, which raised after its fork but before returning the child
        (left running). Blocking the signals cannot do this: one taken by another thread (the
        background sync) still runs the handler in the main thread, inside Popen."""
        before = len(StopSignal.caught)
        StopSignal.deferring += 1
        try:
            yield
        finally:
            StopSignal.deferring -= 1
        if len(StopSignal.caught) > before and not StopSignal.deferring:
            signal.raise_signal(StopSignal.caught[-1])  # the handler in place raises it now

    @classmethod
    def honour(cls) -> None:
        """Raise for a stop whose exception Python dropped."""
        if StopSignal.caught:
            raise cls(StopSignal.caught[-1])


class Stopped(StopSignal):
    """A stop signal before the command ran (the unpack itself has its own: prepare.Interrupted)."""

    message = "stopped by {signal} while starting; the command was not run"
