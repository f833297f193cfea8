"""Find or create the unpacked environment for a tarball: the whole cold and warm path."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from entrypoint import cache, gc, log
from entrypoint.activate import find_python
from entrypoint.cache import Entry
from entrypoint.errors import ArchiveError, ConfigError, EnvError, StopSignal
from entrypoint.settings import Settings
from entrypoint.source import Tarball, content_key

if TYPE_CHECKING:
    from entrypoint.archive import Member
    from entrypoint.extract import Stats
    from entrypoint.remote import RemoteTarball


@dataclass(frozen=True)
class Prepared:
    prefix: Path
    python: Path
    hit: bool


STOP_CLEANUP_SECONDS = 0.3  # a stop's removal of the partial entry: the rest is left (see _abandon)


class Interrupted(StopSignal):
    message = "stopped by {signal} while unpacking; nothing was cached"


def prepare(settings: Settings, tarball: Tarball | RemoteTarball, require: tuple[str, ...] = ()) -> Prepared:
    """The relocated environment's prefix, unpacked now or found complete in the cache.

    `require` names programs the command needs in the environment's bin/ (e.g. "mlserver"): an
    environment without them is refused before it is published.
    """
    with log.phase("locate", {"tarball": tarball.display}) as details:
        key, remembered = content_key(tarball, settings.cache_dir, settings.tarball_sha256)
        entry = Entry(settings.cache_dir, key)
        gc.hold(entry)  # in use until the server exits: gc never removes it under us
        gc.at_start(settings)
        cache.ensure_executable(settings.cache_dir)
        problem = _usable(entry, settings, require)
        details["entry"] = str(entry.prefix)
        if not isinstance(tarball, Tarball):  # a URL: the pin, or the object's ETag/Last-Modified and size
            details["key"] = "the pin" if settings.tarball_sha256 else "the object's identity"
        else:
            details["key"] = "remembered" if remembered else "hashed"
    if problem is None:
        log.info(f"cache hit: {entry.prefix}")
        return Prepared(entry.prefix, find_python(entry.prefix), True)

    cache.ensure_writable(settings.cache_dir)
    from filelock import FileLock, Timeout  # only the cold path needs it

    lock = FileLock(entry.lock, timeout=settings.lock_timeout)
    with _lock_errors(entry, problem):
        _check_lock_file(entry)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.info(f"waiting for another process unpacking {tarball.display} (lock {entry.lock})")
            try:
                lock.acquire()
            except Timeout:
                # Not "remove the lock file": the kernel drops a lock when its holder dies, so a held one
                # is a live unpack (here or in another container on the volume), which a second would corrupt.
                raise ConfigError(
                    f"another process is still unpacking {tarball.display} into {entry.prefix} after "
                    f"{settings.lock_timeout:g} s (MLSERVER_ENV_LOCK_TIMEOUT); start again once it is done, "
                    "or raise the setting"
                ) from None
    try:
        problem = _usable(entry, settings, require)  # someone may have finished while we waited
        if problem is None:
            log.info(f"cache hit after waiting: {entry.prefix}")
            return Prepared(entry.prefix, find_python(entry.prefix), True)
        if problem != "not unpacked yet":
            log.info(f"cache entry {entry.prefix} unusable ({problem}); unpacking again")
        return _unpack(entry, tarball, settings, require)
    finally:
        lock.release()


def _usable(entry: Entry, settings: Settings, require: tuple[str, ...]) -> str | None:
    record = cache.read_marker(entry)
    if record is None:
        return "not unpacked yet"
    if not cache.unpacked_here(entry, record):  # unpacking it again would break whoever uses it there
        raise cache.moved_error(entry, record)
    problem = cache.verify(entry, full=settings.verify == "full")
    if problem is None:
        for program in require:
            if not os.access(entry.prefix / "bin" / program, os.X_OK):
                _missing_program(entry.prefix, program)
    return problem


@contextlib.contextmanager
def _lock_errors(entry: Entry, problem: str) -> Iterator[None]:
    """Taking the unpack lock: another uid's lock file, or what the cache never makes at its name
    (a directory; a symlink, which filelock opens with O_NOFOLLOW: ELOOP), is one line."""
    try:
        yield
    except PermissionError:
        raise _foreign_entry(entry, problem) from None
    except OSError as exc:
        if exc.errno in (errno.EISDIR, errno.ELOOP):
            what = "a directory" if exc.errno == errno.EISDIR else "a symbolic link"
            raise cache.not_ours(entry.lock, what) from None
        raise ConfigError(f"cannot lock {entry.lock} ({exc.strerror}); remove it and try again") from None


def _check_lock_file(entry: Entry) -> None:
    """The lock file, if there, must be a regular file: never a symlink to follow, a FIFO to block on."""
    try:
        st = os.lstat(entry.lock)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode):
        raise cache.not_ours(entry.lock, cache.kind(st))


def _foreign_entry(entry: Entry, problem: str) -> ConfigError:
    """Another uid's start made the entry (a shared volume): this one may not take its lock, so it
    can neither repair nor unpack it."""
    try:
        owner = f"uid {os.stat(entry.lock).st_uid}"
    except OSError:
        owner = "another uid"
    return ConfigError(
        f"cache entry {entry.prefix} must be unpacked ({problem}), but its lock {entry.lock} belongs to {owner}, which "
        f"uid {os.getuid()} may not write; run every start on this cache as one uid (with umask 022 "
        "for others to read it), or give this one its own MLSERVER_ENV_CACHE_DIR"
    )


def _missing_program(prefix: Path, program: str) -> None:
    hint = " and its runtime (e.g. `mlserver-sklearn`)" if program == "mlserver" else ""
    raise EnvError(
        f"environment in {prefix} has no {program}; add `{program}`{hint} to the environment's "
        "pip dependencies and pack it again"
    )


def _unpack(entry: Entry, tarball: Tarball | RemoteTarball, settings: Settings, require: tuple[str, ...]) -> Prepared:
    from entrypoint import archive, extract  # the cold path's heavier imports

    cache.discard(entry)
    previous = _trap_signals()
    try:
        # Write back in the background while extracting, relocating and listing the manifest: the
        # one durability point before publishing (a syncfs) then only waits for the last writes.
        with cache.BackgroundSync(settings.cache_dir) as background:
            if not isinstance(tarball, Tarball):  # a URL: streamed, retried, SHA-256 checked (entrypoint/remote.py)
                from entrypoint import remote

                with log.phase("extract") as details:
                    stats = remote.extract(tarball, entry, settings)
                    details.update(files=stats.files, MB=round(stats.bytes / 1e6))
            else:
                with log.phase("extract") as details, open(tarball.path, "rb") as raw:
                    if os.fstat(raw.fileno()).st_ino != tarball.identity[1]:
                        raise ConfigError(f"{tarball.display} was replaced while starting; start again")
                    os.mkdir(entry.prefix, 0o755)
                    try:
                        progress = log.Progress("extract", tarball.size, raw.tell)
                        stats = extract.extract(
                            _ticking(archive.members(raw), progress),
                            entry.prefix,
                            extract.Limits(settings.max_members, settings.max_unpacked_bytes),
                        )
                    except archive.CORRUPT as exc:
                        _refuse_if_changed(raw.fileno(), tarball)
                        raise archive.corrupt(exc, tarball.display) from None
                    except ArchiveError:
                        _refuse_if_changed(raw.fileno(), tarball)
                        raise
                    finally:
                        progress.done()  # also before an error line, which would follow the drawn one
                    _refuse_if_changed(raw.fileno(), tarball)
                    details.update(files=stats.files, MB=round(stats.bytes / 1e6))
            with log.phase("relocate") as details:
                python = find_python(entry.prefix)
                for program in require:
                    if not os.access(entry.prefix / "bin" / program, os.X_OK):
                        _missing_program(entry.prefix, program)
                details["conda-unpack"] = _relocate(entry, stats, python, settings)
            with log.phase("publish"), _cache_writes(entry, stats):
                Interrupted.honour()  # before the sync it would waste
                cache.write_manifest(entry)  # the last writes go back meanwhile
                background.stop()
                cache.publish(entry, {"tarball": tarball.display, "files": stats.files, "bytes": stats.bytes})
        gc.at_start(settings)  # the cache just grew
        Interrupted.honour()  # the last moment a stop can still undo the unpack
    except ArchiveError as exc:
        _abandon(entry)
        raise ArchiveError(f"{tarball.display}: {exc}" if tarball.display not in str(exc) else str(exc)) from None
    except BaseException:
        _abandon(entry)
        raise
    _restore_signals(previous)  # not after a failure: the start ends with its error, see _abandon
    return Prepared(entry.prefix, python, False)


@contextlib.contextmanager
def _cache_writes(entry: Entry, stats: Stats) -> Iterator[None]:
    """After the extraction: the disk filled up (a text file's new prefix is longer, the manifest),
    or the cache turned read-only; one line naming the setting to change."""
    from entrypoint import extract

    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            members = stats.files + stats.dirs + stats.symlinks + stats.hardlinks
            raise extract.no_space_error(entry.prefix, stats.disk_bytes, members) from None
        raise extract.write_error(exc, entry.prefix) from None


def _relocate(entry: Entry, stats: Stats, python: Path, settings: Settings) -> str:
    """Relocate the environment as its conda-unpack would; says how, for the log."""
    from entrypoint import relocate

    prefix = entry.prefix
    script = relocate.read_unpack_script(prefix)
    if script is None:
        return "absent (not a conda-pack archive)"
    relocate.check_prefix_length(script.records, prefix)
    if script.in_process(settings.relocate):
        with _cache_writes(entry, stats):
            changed = relocate.rewrite_prefixes(prefix, script.records)
        if changed is not None:
            return f"{len(script.records)} files, {changed} changed, in-process by {script.known}'s rules"
    relocate.run_conda_unpack(prefix, python)
    return f"{len(script.records)} files, by {relocate.UNPACK_SCRIPT}"


def _refuse_if_changed(fd: int, tarball: Tarball) -> None:
    """The file's bytes are no longer those hashed: refuse what was read. Also when they made the
    archive look corrupt (a tarball copied over in place while read): it needs no packing again."""
    st = os.fstat(fd)
    # ctime too: a rewrite in place that restores size and mtime (rsync --inplace, touch -r)
    # still changes it, and the key (or the SHA-256 pin) was computed from the old bytes.
    if (st.st_size, st.st_mtime_ns, st.st_ctime_ns) != tuple(tarball.identity[2:5]):
        raise ConfigError(f"{tarball.display} changed while it was being read; start again")


def _ticking(members: Iterator[Member], progress: log.Progress) -> Iterator[Member]:
    for m in members:
        progress.tick()
        yield m


def _abandon(entry: Entry) -> None:
    """Nothing half-made stays behind: remove the partial entry (the next start would anyway).

    After a stop signal (also one a library swallowed before another error ended the start), for
    STOP_CLEANUP_SECONDS at most: removing 17,000 files took 1-2 s on a loaded disk, once 37 s,
    past `docker stop`'s 10 s. What is left then is an unmarked directory, which the next start of
    this tarball or gc removes, as after a kill -9.

    A second SIGTERM or Ctrl-C must not stop the removal half-way, nor replace the error the start
    ends with (or add a traceback to its one line): from here on they are ignored. Deferred first,
    as signal.signal runs a pending handler before it installs the new one."""
    StopSignal.deferring += 1  # for good: the start is ending
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, signal.SIG_IGN)
    deadline = time.monotonic() + STOP_CLEANUP_SECONDS if StopSignal.caught else None
    try:
        if not cache.discard(entry, deadline):
            log.info(
                f"left part of the unfinished entry {entry.prefix}; the next start of this tarball or gc removes it"
            )
    except OSError as exc:
        log.info(f"could not remove partial entry {entry.prefix} ({exc.strerror}); the next start will")
    except ConfigError as exc:  # after the error that ends the start, which it must not replace
        log.info(f"could not remove partial entry {entry.prefix}: {exc}")


def _trap_signals() -> dict[int, object]:
    """SIGTERM (a container stop) during the unpack cleans up like Ctrl-C does. Also a SIGINT the
    start was given ignored (a background job of a script): a harness stopping it with SIGINT
    expects the cleanup and 130, which the unpack is the one long phase to owe."""
    return {s: signal.signal(s, Interrupted.handler) for s in (signal.SIGTERM, signal.SIGINT)}


def _restore_signals(previous: dict[int, object]) -> None:
    for s, handler in previous.items():
        signal.signal(s, handler)  # type: ignore[arg-type]
