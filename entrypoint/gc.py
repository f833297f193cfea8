"""Cache garbage collection: drop entries by age and total size, oldest-used first, never one in use.

"In use" is a shared flock on `<key8>.use`, taken by every start before it looks at the entry and
kept for the life of the server: the descriptor is inheritable, so the exec'd mlserver (and any
process it forks) holds it on, and the kernel drops it when the last holder exits, even by
kill -9. gc removes an entry only while holding the exclusive lock, taken without waiting, so
it skips every entry a live process uses. "Last used" is that file's mtime, touched at each start.

Both sides check, after locking, that the path still names the file they locked: gc unlinks
`.use` when it removes an entry, and a start that locked the unlinked file must not count on it.
Every start holds `.use` before it takes the unpack lock `.lock`, so gc may delete `.lock` too.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from entrypoint import cache, log
from entrypoint.cache import Entry
from entrypoint.errors import ConfigError

if TYPE_CHECKING:  # hold() runs on the pydantic-free warm path (fastpath)
    from entrypoint.settings import Settings

DAY = 86400.0
NAME = re.compile(r"([0-9a-f]{8})(?:\.(ready|manifest|lock|use))?")
_held: dict[Path, int] = {}  # `.use` files this process holds; never closed, inherited by exec


def use_file(entry: Entry) -> Path:
    return entry.root / f"{entry.name}.use"


def hold(entry: Entry) -> None:
    """Mark `entry` used by this process and whatever it execs, until they all exit; touch its mtime.

    Blocks only while a gc is removing this very entry (the start then unpacks it again). Best
    effort on a cache this user cannot write: without the file there is nothing to hold.
    """
    path = use_file(entry)
    if path in _held:
        return
    for _ in range(100):
        try:
            fd = _open(path, create=True)
        except FileNotFoundError:
            try:
                entry.root.mkdir(parents=True, exist_ok=True)
            except OSError:
                return
            continue
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise cache.not_ours(path, "a symbolic link") from None
            try:
                fd = _open(path, create=False)
            except OSError as again:
                if again.errno == errno.ELOOP:
                    raise cache.not_ours(path, "a symbolic link") from None
                return  # read-only cache without the file: nobody can gc it from here either
        _regular(fd, path)
        fcntl.flock(fd, fcntl.LOCK_SH)
        if _names(fd, path):
            os.set_inheritable(fd, True)
            with contextlib.suppress(OSError):
                os.utime(fd)  # "last used": now, through the descriptor
            _held[path] = fd
            return
        os.close(fd)  # gc removed the file we locked; lock the new one


# Never through a symlink planted at the name (O_CREAT would create its target, utime touch it),
# and never blocking on a FIFO there.
_USE_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _open(path: Path, create: bool) -> int:
    if create:
        return os.open(path, os.O_RDWR | os.O_CREAT | _USE_FLAGS, 0o644)
    return os.open(path, os.O_RDONLY | _USE_FLAGS)


def _regular(fd: int, path: Path) -> None:
    """Refuse (closing `fd`) a `.use` that is not a regular file: a directory or a FIFO there opens."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise cache.not_ours(path, cache.kind(st))


def _names(fd: int, path: Path) -> bool:
    """Whether `path` still is the file open as `fd`."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def _exclusive(entry: Entry, create: bool) -> Iterator[bool]:
    """Hold the entry's exclusive lock, if no process uses it; yields whether it was taken."""
    path = use_file(entry)
    try:  # a dry run only looks: reading is enough to lock, also on a cache mounted read-only
        fd = _open(path, create)
    except FileNotFoundError:
        yield True  # dry run: no start ever held it (a start creates the file before anything else)
        return
    except PermissionError:
        raise ConfigError(
            f"cannot lock {path} (uid {os.getuid()} may not write it); run gc as the cache's owner"
        ) from None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EISDIR):
            raise cache.not_ours(path, "a symbolic link" if exc.errno == errno.ELOOP else "a directory") from None
        if exc.errno != errno.EROFS:
            raise
        raise ConfigError(
            f"cache directory {entry.root} is read-only here: gc can remove nothing; run it where the cache "
            "is mounted writable (or add --dry-run to list what it would remove)"
        ) from None
    _regular(fd, path)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield _names(fd, path)
    finally:
        os.close(fd)


class Item(NamedTuple):  # NamedTuples: gc is imported by the warm path, dataclasses is slow to import
    entry: Entry
    complete: bool
    size: int  # bytes, as recorded at unpack (complete) or counted now (incomplete)
    last_used: float  # epoch seconds


def scan(root: Path) -> list[Item]:
    """Every entry in the cache (complete, partial or just leftover lock files), oldest-used first."""
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    except NotADirectoryError:
        raise ConfigError(
            f"cache directory {root} is not a directory; set MLSERVER_ENV_CACHE_DIR to the cache's directory"
        ) from None
    except PermissionError:
        raise ConfigError(
            f"cache directory {root} cannot be listed by uid {os.getuid()}; run gc as the cache's owner, "
            "or set MLSERVER_ENV_CACHE_DIR to a cache this user may read"
        ) from None
    # An entry is ours only with one of its own files beside it (a start takes `.use` and `.lock`
    # before it creates the directory): a bare 8-hex-digit name in a cache directory pointed at a
    # shared place (/tmp, the models folder) belongs to someone else and is never removed.
    keys = sorted({m.group(1) for n in names if (m := NAME.fullmatch(n)) and m.group(2)})
    items = []
    for key8 in keys:
        entry = Entry(root, key8)
        record = _marker(entry)
        sha, size = (record or {}).get("sha256"), (record or {}).get("bytes")
        complete = isinstance(sha, str) and sha.startswith(key8)
        if complete and isinstance(sha, str):
            entry = Entry(root, sha)
        if not (complete and isinstance(size, int)):
            size = _du(entry.prefix)
        # Last used: the start that touched `.use`, or the unpack that wrote the marker; for a partial
        # entry, when it was begun.
        times = [t for p in (use_file(entry), entry.marker) if (t := _mtime(p)) is not None]
        times = times or [t for p in (entry.prefix, entry.lock) if (t := _mtime(p)) is not None]
        items.append(Item(entry, complete, size, max(times, default=0.0)))
    items.sort(key=lambda i: i.last_used)
    return items


def _marker(entry: Entry) -> dict[str, object] | None:
    try:
        data = cache.read_small(entry.marker, cache.MARKER_MAX)  # bigger: damage, the entry is incomplete
        record = json.loads(data) if data is not None else None
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _mtime(path: Path) -> float | None:
    try:
        return os.stat(path, follow_symlinks=False).st_mtime
    except OSError:
        return None


def _du(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


class Outcome(NamedTuple):
    item: Item
    action: str  # "removed", "would remove", "in use", "kept"
    reason: str


def collect(root: Path, max_bytes: int | None, max_age_days: float | None, dry_run: bool) -> list[Outcome]:
    """Remove entries older than `max_age_days`, then the oldest-used until the rest fit `max_bytes`.

    Partial entries (a start killed while unpacking) and leftover lock files go whenever no
    process holds them. Entries in use are kept and still count towards `max_bytes`.
    """
    items = scan(root)
    total = sum(i.size for i in items)
    now = time.time()
    out = []
    for item in items:
        if not item.complete:
            reason = "incomplete"
        elif max_age_days is not None and now - item.last_used > max_age_days * DAY:
            reason = f"unused for {(now - item.last_used) / DAY:.1f} days"
        elif max_bytes is not None and total > max_bytes:
            reason = f"cache over {max_bytes} bytes"
        else:
            out.append(Outcome(item, "kept", ""))
            continue
        with _exclusive(item.entry, create=not dry_run) as free:
            if not free:
                out.append(Outcome(item, "in use", reason))
                continue
            if not dry_run:
                _remove(item.entry)
        total -= item.size
        out.append(Outcome(item, "would remove" if dry_run else "removed", reason))
    if not dry_run:
        _sweep_key_memos(root)
    return out


# The names source._remember gives the files of `.keys/`: a memo (two zlib checksums, cache.key_memo)
# and its temporary (`<memo>.<pid>.<random>.tmp`; `<memo>.<pid>.tmp` before the random part). gc
# removes nothing else there: a cache directory pointed at a shared place may hold someone else's `.keys`.
MEMO = re.compile(r"[0-9a-f]{16}")
MEMO_TMP = re.compile(r"[0-9a-f]{16}\.[0-9]+(?:\.[0-9a-f]{16})?\.tmp")


def keys_dir(root: Path) -> int | None:
    """`<root>/.keys` opened as a directory, never through a symlink; None (with a warning) if it is
    a symlink or not a directory: it is then not the cache's own, and nothing is written or removed
    in it. None also if it is missing or cannot be opened."""
    path = root / ".keys"
    try:
        return os.open(path, cache.DIR_OPEN)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            log.info(
                f"warning: {path} is a symbolic link or not a directory, so not the cache's own: tarball keys are "
                f"neither remembered nor swept there (each start hashes the tarball again); remove it (rm {path})"
            )
        return None


def _sweep_key_memos(root: Path) -> None:
    """Drop the remembered keys (source.content_key) that no longer lead anywhere: temporaries a
    start was killed while writing, and memos whose entry is gone. Each holds a path and a key, so
    without this `.keys/` grows by one file per tarball path ever used. A minute's grace: a start
    writes its memo just before it creates the entry's files. Losing a memo costs one re-hash.

    Only regular files named as source._remember names them (MEMO, MEMO_TMP), through a descriptor
    of `.keys` opened without following a symlink (keys_dir)."""
    try:
        ours = {m.group(1) for n in os.listdir(root) if (m := NAME.fullmatch(n)) and m.group(2)}
    except OSError:
        return
    dfd = keys_dir(root)
    if dfd is None:
        return
    try:
        now = time.time()
        with os.scandir(dfd) as it:
            names = [e.name for e in it if MEMO.fullmatch(e.name) or MEMO_TMP.fullmatch(e.name)]
        for name in names:
            with contextlib.suppress(OSError):
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                if not stat.S_ISREG(st.st_mode) or now - st.st_mtime <= 60:
                    continue
                if MEMO.fullmatch(name):
                    key = _memo_key(dfd, name)
                    if key is not None and key[: cache.KEY_CHARS] in ours:
                        continue
                os.unlink(name, dir_fd=dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def _memo_key(dfd: int, name: str) -> str | None:
    """The key a memo holds; None if it is unreadable, oversized or not a memo (worthless)."""
    try:
        data = cache.read_small(name, cache.MEMO_MAX, dir_fd=dfd, flags=os.O_NOFOLLOW)
        key = json.loads(data)["sha256"] if data is not None else None
    except (ValueError, KeyError, TypeError):
        return None
    return key if isinstance(key, str) else None


def _remove(entry: Entry) -> None:
    """Under the exclusive lock: marker first (cache.discard), then data, then the lock files."""
    cache.discard(entry)
    for path in (entry.lock, use_file(entry)):
        cache.remove_file(path)


def at_start(settings: Settings) -> None:
    """The optional bound (MLSERVER_ENV_CACHE_MAX_BYTES / _MAX_AGE), applied when a start holds its
    own entry, so that entry is never the one removed. Cheap when nothing is over the bound:
    one directory listing and the small completion markers."""
    if settings.cache_max_bytes is None and settings.cache_max_age is None:
        return
    try:
        outcomes = collect(settings.cache_dir, settings.cache_max_bytes, settings.cache_max_age, dry_run=False)
    except (OSError, ConfigError) as exc:  # a start never fails over housekeeping
        log.info(f"gc: skipped ({exc})")
        return
    for o in outcomes:
        if o.action == "removed":
            log.info(f"gc: removed {o.item.entry.prefix} ({o.item.size / 1e6:.0f} MB, {o.reason})")


def parse_bytes(value: str) -> int:
    """`10GiB`, `500MB`, `1e9` or plain bytes, as pydantic's ByteSize reads them."""
    from pydantic import ByteSize, TypeAdapter, ValidationError

    try:
        return int(TypeAdapter(ByteSize).validate_python(value))
    except ValidationError:
        raise ConfigError(f"--max-bytes {value}: not a size; write e.g. 20GiB, 500MB or a number of bytes") from None


def main(args: list[str], settings: Settings) -> int:
    """`gc [--max-bytes N] [--max-age DAYS] [--dry-run]`; bounds default to the settings."""
    max_bytes: int | None = settings.cache_max_bytes
    max_age, dry_run = settings.cache_max_age, False
    it = iter(args)
    for arg in it:
        name, _, value = arg.partition("=")
        if name in ("--max-bytes", "--max-age") and not value:
            value = next(it, "")
            if not value:
                raise ConfigError(f"{name} needs a value, e.g. {name} {'20GiB' if name == '--max-bytes' else '7'}")
        if name == "--max-bytes":
            max_bytes = parse_bytes(value)
        elif name == "--max-age":
            try:
                max_age = float(value)
            except ValueError:
                max_age = -1.0
            if not 0 <= max_age < float("inf"):  # as MLSERVER_ENV_CACHE_MAX_AGE
                raise ConfigError(f"--max-age {value!r}: give a number of days, 0 or more, e.g. 7 or 0.5")
        elif arg == "--dry-run":
            dry_run = True
        else:
            raise ConfigError(f"usage: gc [--max-bytes N] [--max-age DAYS] [--dry-run] (got {arg})")
    outcomes = collect(settings.cache_dir, max_bytes, max_age, dry_run)
    for o in outcomes:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(o.item.last_used))
        why = f" ({o.reason})" if o.reason else ""
        log.out(f"{o.action:<13}{o.item.entry.prefix}  {o.item.size / 1e6:8.0f} MB  last used {used}{why}")
    gone = [o.item for o in outcomes if o.action in ("removed", "would remove")]
    kept = [o.item for o in outcomes if o.action in ("kept", "in use")]
    log.out(
        f"{settings.cache_dir}: {'would free' if dry_run else 'freed'} {sum(i.size for i in gone) / 1e6:.0f} MB "
        f"in {len(gone)} entries; {sum(i.size for i in kept) / 1e6:.0f} MB in {len(kept)} entries kept"
    )
    return 0
