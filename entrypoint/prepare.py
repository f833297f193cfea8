"""The cold path, run in a worker process (worker.py): read the settings, find the tarballs (the
server's and each model's own, models.py) and their keys, hold every entry, then, under each
entry's lock, extract, relocate and publish it, unless it is there already.

A failure removes the partial entry before the error line; a stop kills the worker, and the
entrypoint removes what the worker announced (`{"entry": …}`) with a bounded effort.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from entrypoint import activate, archive, entry, extract, fs, gc, lease, log, manifest, settings, source, warm, worker
from entrypoint.entry import Entry
from entrypoint.errors import ArchiveError, ConfigError, EntrypointError
from entrypoint.extract import Stats
from entrypoint.models import ModelEnv
from entrypoint.settings import Settings
from entrypoint.source import Tarball
from entrypoint.worker import Message

if TYPE_CHECKING:
    from entrypoint.remote import RemoteTarball

Send = Callable[[Message], None]


class Job(NamedTuple):
    config: Settings  # a model's: with its own tarball and pin (warm.for_model)
    tarball: Tarball | RemoteTarball
    require: tuple[str, ...]
    label: str | None  # names a model's environment in its errors


def main(send: Send, require: tuple[str, ...], wanted: list[ModelEnv]) -> int:
    """The worker's job: prepare the environment and each model's, and send their keys and the
    settings read."""
    if (hashed := warm.to_hash(os.environ)) is not None:
        source.prehash(*hashed)
    config = settings.load()
    tarball = source.locate(config)
    server = [] if tarball is None else [Job(config, tarball, require, None)]
    shared = list(dict.fromkeys((m.tarball, m.sha256) for m in wanted))  # one job per tarball and pin
    jobs = server + [_model_job(config, next(m for m in wanted if (m.tarball, m.sha256) == t)) for t in shared]
    # Every entry is located and held before any is prepared: the cache bounds remove none of them.
    entries = [locate(job) for job in jobs]
    for job, found in zip(jobs, entries, strict=True):
        prepare(job, found, send)
    keys = [entries[len(server) + shared.index((m.tarball, m.sha256))].key for m in wanted]
    key = entries[0].key if server else None
    send({"result": {"key": key, "models": keys, "settings": settings.dump(config)}})
    return 0


def _model_job(config: Settings, model: ModelEnv) -> Job:
    own = warm.for_model(config, model)
    with _about(model.label):
        tarball = source.locate(own, model.label)
    assert tarball is not None  # a model names a tarball (models.find)
    return Job(own, tarball, ("mlserver",), model.label)


@contextlib.contextmanager
def _about(label: str | None) -> Iterator[None]:
    """Errors naming the model whose environment is being prepared."""
    try:
        yield
    except EntrypointError as exc:
        if label is None:
            raise
        raise exc.about(label) from exc


def locate(job: Job) -> Entry:
    """The entry of the job's tarball in the cache, held by this process (gc removes it no more)."""
    config, tarball = job.config, job.tarball
    with _about(job.label), log.phase("locate", {"tarball": tarball.display}) as details:
        key, remembered = source.content_key(tarball, config.cache_dir, config.tarball_sha256)
        found = Entry(config.cache_dir, key)
        lease.hold(found)  # before the marker is read: no gc removes it from here on
        details["entry"] = str(found.prefix)
        details["key"] = "remembered" if remembered else "hashed"
        if not isinstance(tarball, Tarball):
            details["key"] = "the pin" if config.tarball_sha256 else "the object's identity"
    return found


def prepare(job: Job, found: Entry, send: Send) -> None:
    """`found`, the entry of the job's tarball, published: found in the cache, or unpacked now."""
    config, require = job.config, job.require
    with _about(job.label):
        gc.at_start(config)
        entry.ensure_executable(config.cache_dir)
        problem = _problem(found, config, require)
        if problem is None:
            log.info(f"cache hit: {found.prefix}")
            return
        entry.ensure_writable(config.cache_dir)
        with _locked(found, config.lock_timeout, job.tarball.display, problem):
            problem = _problem(found, config, require)  # another process may have unpacked it meanwhile
            if problem is None:
                log.info(f"cache hit after waiting: {found.prefix}")
                return
            if problem != "not unpacked yet":
                log.info(f"cache entry {found.prefix} unusable ({problem}); unpacking again")
            send({"entry": [str(found.root), found.key]})
            _unpack(found, job.tarball, config, require)


def _problem(found: Entry, config: Settings, require: tuple[str, ...]) -> str | None:
    problem = entry.problem(found, config.verify == "full")
    if problem is None:
        activate.require(found.prefix, require)
    return problem


@contextlib.contextmanager
def _locked(found: Entry, timeout: float, display: str, problem: str) -> Iterator[None]:
    """Hold the entry's unpack lock, waiting for another process unpacking it."""
    from filelock import FileLock, Timeout

    lock = FileLock(found.lock, timeout=timeout)
    with _lock_errors(found, problem):
        _check_lock_file(found)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.info(f"waiting for another process unpacking {display} (lock {found.lock})")
            try:
                lock.acquire()
            except Timeout as exc:  # a held lock is a live unpack: never advise removing it
                raise ConfigError(
                    f"another process is still unpacking {display} into {found.prefix} after {timeout:g} s "
                    "(MLSERVER_ENV_LOCK_TIMEOUT)",
                    "start again once it is done, or raise the setting",
                ) from exc
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def _lock_errors(found: Entry, problem: str) -> Iterator[None]:
    """Another uid's lock file, or what the cache never makes at its name, is one line."""
    try:
        yield
    except PermissionError as exc:
        owner = f"uid {os.stat(found.lock).st_uid}" if os.path.exists(found.lock) else "another uid"
        raise ConfigError(
            f"cache entry {found.prefix} must be unpacked ({problem}), but its lock {found.lock} belongs to {owner}, "
            f"which uid {os.getuid()} may not write",
            "run every start on this cache as one uid (with umask 022 for others to read it), or give this one "
            "its own MLSERVER_ENV_CACHE_DIR",
        ) from exc
    except OSError as exc:
        if exc.errno in (errno.EISDIR, errno.ELOOP):
            raise fs.not_ours(found.lock, "a directory" if exc.errno == errno.EISDIR else "a symbolic link") from exc
        raise ConfigError(f"cannot lock {found.lock} ({exc.strerror})", "remove it and try again") from exc


def _check_lock_file(found: Entry) -> None:
    """The lock file, if there, must be a regular file: never a symlink to follow, a FIFO to block on."""
    try:
        st = os.lstat(found.lock)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode):
        raise fs.not_ours(found.lock, fs.kind(st))


def _unpack(found: Entry, tarball: Tarball | RemoteTarball, config: Settings, require: tuple[str, ...]) -> None:
    """Extract, relocate and publish; on any failure the partial entry is removed first."""
    try:
        entry.discard(found)
        with fs.BackgroundSync(config.cache_dir):
            stats = _extract(found, tarball, config)
            with log.phase("relocate") as details:
                python = activate.find_python(found.prefix)
                activate.require(found.prefix, require)
                details["conda-unpack"] = _relocate(found, stats, python, config)
        with log.phase("publish"), _cache_writes(found, stats):
            manifest.write(found)
            entry.publish(found, {"tarball": tarball.display, "files": stats.files, "bytes": stats.bytes})
    except BaseException:
        _remove(found)
        raise
    gc.at_start(config)  # the cache just grew


def _extract(found: Entry, tarball: Tarball | RemoteTarball, config: Settings) -> Stats:
    limits = extract.limits_for(config.max_members, config.max_unpacked_bytes, found.prefix)
    with log.phase("extract") as details:
        if isinstance(tarball, Tarball):
            stats = _extract_file(found, tarball, limits)
        else:
            from entrypoint import remote

            stats = remote.extract(tarball, found, config, limits)
        details.update(files=stats.files, MB=round(stats.bytes / 1e6))
    return stats


def _extract_file(found: Entry, tarball: Tarball, limits: extract.Limits) -> Stats:
    with open(tarball.path, "rb") as raw:
        source.unchanged(tarball, raw.fileno())  # the very file hashed
        os.mkdir(found.prefix, 0o755)
        try:
            with log.Progress("extract", tarball.size, raw.tell) as progress:
                stats = extract.extract(progress.through(archive.members(raw)), found.prefix, limits)
        except ArchiveError as exc:
            _refuse_if_changed(raw.fileno(), tarball)
            raise exc.about(tarball.display) from exc
        _refuse_if_changed(raw.fileno(), tarball)
    return stats


def _refuse_if_changed(fd: int, tarball: Tarball) -> None:
    """The file's bytes may no longer be those hashed (ctime too: a rewrite in place that restores
    size and mtime still changes it): refuse what was read, also when it looked corrupt."""
    st = os.fstat(fd)
    if (st.st_size, st.st_mtime_ns, st.st_ctime_ns) != tuple(tarball.identity[2:5]):
        raise ConfigError(f"{tarball.display} changed while it was being read", "start again")


@contextlib.contextmanager
def _cache_writes(found: Entry, stats: Stats) -> Iterator[None]:
    """After the extraction, the disk filled up (a longer prefix in text files, the manifest) or
    the cache turned read-only: one line naming the setting."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise extract.no_space_error(found.prefix, stats.disk_bytes, stats.members) from exc
        raise extract.write_error(exc, found.prefix) from exc


def _relocate(found: Entry, stats: Stats, python: Path, config: Settings) -> str:
    """Relocate the environment as its conda-unpack would; says how, for the log."""
    from entrypoint import relocate

    script = relocate.read_unpack_script(found.prefix)
    if script is None:
        return "absent (not a conda-pack archive)"
    relocate.check_prefix_length(script.records, found.prefix)
    if script.in_process(config.relocate):
        with _cache_writes(found, stats):
            changed = relocate.rewrite_prefixes(found.prefix, script.records)
        if changed is not None:
            return f"{len(script.records)} files, {changed} changed, in-process by {script.known}'s rules"
    relocate.run_conda_unpack(found.prefix, python)
    return f"{len(script.records)} files, by {relocate.UNPACK_SCRIPT}"


def _remove(found: Entry) -> None:
    """Nothing half-made stays behind; what cannot be removed is said, after the error."""
    try:
        entry.discard(found)
    except (OSError, ConfigError) as exc:
        log.info(f"could not remove partial entry {found.prefix} ({exc}); the next start will")


def abandon(messages: list[Message]) -> tuple[str, str]:
    """After a stop ended the worker: remove the entry it was unpacking, for worker.UNDO_TIME at
    most; what is left then is unmarked, and the next start or gc removes it. What the start was
    doing, and what it leaves."""
    import time

    announced = [m["entry"] for m in messages if "entry" in m]
    if not announced:
        return "starting", "the command was not run"
    found = Entry(Path(announced[-1][0]), announced[-1][1])
    outcome = entry.abandon(found, time.monotonic() + worker.UNDO_TIME)
    if outcome == "published":
        return "starting", f"the command was not run ({found.prefix} is unpacked and cached)"
    if outcome == "left":
        log.info(f"left part of the unfinished entry {found.prefix}; the next start of this tarball or gc removes it")
    return "unpacking", "nothing was cached"
