"""Errors a user can act on: a message, what to do about it, and the exit code, as fields.

The CLI prints one line, `message; advice`, and exits with the code. Anything else that is raised
is a bug and ends with its traceback.
"""

from __future__ import annotations

import signal


class EntrypointError(Exception):
    exit_code = 1
    advice = ""
    trace = ""  # the traceback of an error a worker reported, for MLSERVER_ENV_DEBUG

    def __init__(self, message: str, advice: str | None = None, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if advice is not None:
            self.advice = advice
        if exit_code is not None:
            self.exit_code = exit_code

    @property
    def line(self) -> str:
        return f"{self.message}; {self.advice}" if self.advice else self.message

    def about(self, where: str) -> EntrypointError:
        """The same error, its message prefixed with what it is about (an archive's path)."""
        message = self.message if self.message.startswith(f"{where}:") else f"{where}: {self.message}"
        return type(self)(message, self.advice, self.exit_code)


class ConfigError(EntrypointError):
    """A setting, the cache directory or the tarball's place is wrong."""

    exit_code = 2


def out_of_processes(exc: BaseException) -> ConfigError:
    """A process or thread that cannot be started: the user's process limit is reached."""
    return ConfigError(
        f"cannot start another process or thread ({exc})",
        "raise the limit on processes (a container's --pids-limit, a pod's pid limit, ulimit -u) or run fewer "
        "as this user",
    )


ARCHIVE_ADVICE = "pack the environment again with conda-pack (this archive is damaged, or not one it writes)"


class ArchiveError(EntrypointError):
    """The archive is unreadable, corrupt, hostile or over a limit; nothing was cached."""

    exit_code = 3
    advice = ARCHIVE_ADVICE


class EnvError(EntrypointError):
    """The unpacked environment cannot run here (no interpreter, another platform, no mlserver)."""

    exit_code = 4


class OutputError(EntrypointError):
    """Standard output cannot be written (closed, or a full disk under `gc > file`)."""


class CommandNotRunnable(EntrypointError):
    """The command names a file that cannot be run: 126, as a shell says."""

    exit_code = 126


class CommandNotFound(EntrypointError):
    """The command is on no PATH: 127, as a shell says."""

    exit_code = 127


class Stopped(EntrypointError):
    """A stop signal ended the start: 128 + its number, as a shell reports it (143, 130)."""

    def __init__(self, signum: int, doing: str, outcome: str) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} while {doing}", outcome, 128 + signum)
