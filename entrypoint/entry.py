"""A cache entry: one unpacked environment per tarball content, used only once published.

Layout under MLSERVER_ENV_CACHE_DIR (short names: the entry's path is the environment's prefix,
and conda-unpack cannot write a prefix longer than the packed one into binary files):

    <key8>/          the unpacked, relocated environment
    <key8>.lock      held (flock) by the one process unpacking it; the kernel drops it if that dies
    <key8>.ready     the marker, JSON, written last by rename once the data is durable
    <key8>.manifest  every file's size, mode and mtime, to check the entry at start (manifest.py)
    <key8>.use       held (shared flock) by every process using the entry (lease.py, gc.py)
    .keys/           remembered digests of tarball paths (keys.py)

An entry without its marker is never used: a process killed at any moment leaves at most an
unmarked directory, which the next start removes under the lock before unpacking again.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from entrypoint import fs
from entrypoint.errors import ConfigError

KEY_CHARS = 8
MARKER_MAX = 1 << 16  # a marker holds a key, two paths and a few numbers; a bigger one is damage


class Entry:
    """The paths of the entry of content `key` in the cache at `root`."""

    __slots__ = ("key", "lock", "manifest", "marker", "name", "prefix", "root", "use")

    def __init__(self, root: Path, key: str) -> None:
        self.root, self.key, self.name = root, key, key[:KEY_CHARS]
        self.prefix = root / self.name
        self.marker, self.lock, self.manifest, self.use = (root / f"{self.name}.{s}" for s in FILES)


FILES = ("ready", "lock", "manifest", "use")


def read_marker(entry: Entry, key_prefix_only: bool = False) -> dict[str, object] | None:
    """The entry's marker, if it is whole and names this very content (or, `key_prefix_only`, any
    content whose key starts with the entry's name: gc does not know the whole key)."""
    try:
        data = fs.read_small(entry.marker, MARKER_MAX, flags=os.O_NOFOLLOW)  # a symlink there: damage
        record = json.loads(data) if data is not None else None
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    key = marker_key(record)
    ok = isinstance(key, str) and (key.startswith(entry.name) if key_prefix_only else key == entry.key)
    return record if ok else None


def marker_key(record: dict[str, object]) -> object:
    """The key a marker names; 0.1.0 wrote it as "sha256" only, and its entries still count."""
    return record.get("key", record.get("sha256"))


def unpacked_here(entry: Entry, record: dict[str, object]) -> bool:
    """Whether the marker was written at this very path (or one naming the same directory): the
    relocated files name that path."""
    recorded = record.get("prefix")
    if recorded == str(entry.prefix):
        return True
    try:
        return isinstance(recorded, str) and os.path.samefile(recorded, entry.prefix)
    except OSError:
        return False


def problem(entry: Entry, full: bool) -> str | None:
    """What keeps a published entry from being used (None: nothing); one unpacked at another path
    is an error, as unpacking it again would break whoever uses it there."""
    from entrypoint import manifest

    record = read_marker(entry)
    if record is None:
        return "not unpacked yet"
    if not unpacked_here(entry, record):
        raise moved_error(entry, record)
    return manifest.verify(entry, full)


def moved_error(entry: Entry, record: dict[str, object]) -> ConfigError:
    recorded = Path(str(record.get("prefix")))
    return ConfigError(
        f"the cached environment {entry.prefix} was unpacked at {recorded}, and its files name that path",
        f"mount the cache volume at {recorded.parent} here too, or give this start its own MLSERVER_ENV_CACHE_DIR",
    )


def ensure_writable(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot create cache directory {root} ({exc.strerror})",
            "set MLSERVER_ENV_CACHE_DIR to a writable directory or mount a volume there",
        ) from exc
    if not os.access(root, os.W_OK | os.X_OK):
        raise ConfigError(
            f"cache directory {root} is not writable by uid {os.getuid()}",
            "set MLSERVER_ENV_CACHE_DIR to a writable directory or mount a writable volume there",
        )
    ensure_executable(root)


def ensure_executable(root: Path) -> None:
    """The environment's programs run from the cache: on a filesystem mounted noexec none can, and
    a command would resolve to the host's instead."""
    try:
        noexec = os.statvfs(root).f_flag & os.ST_NOEXEC
    except OSError:
        return  # not there yet: ensure_writable creates it, then checks again
    if noexec:
        raise ConfigError(
            f"cache directory {root} is on a filesystem mounted noexec, so the environment's programs cannot run "
            "from it",
            f"mount it with exec (docker run --tmpfs {root}:exec) or set MLSERVER_ENV_CACHE_DIR to a directory on "
            "another filesystem",
        )


def publish(entry: Entry, record: dict[str, object]) -> None:
    """Make the entry durable, then visible: one filesystem sync, then the marker by rename."""
    fs.syncfs(entry.root)
    # "sha256" too: what 0.1.0 reads the key from, so its starts and gc on a shared cache keep this entry.
    record = {**record, "key": entry.key, "sha256": entry.key, "prefix": str(entry.prefix), "published": time.time()}
    fs.write_atomic(entry.marker, json.dumps(record, indent=1).encode())


def discard(entry: Entry, deadline: float | None = None) -> bool:
    """Remove an entry, marker first and durably, so no crash leaves a marked partial entry; also
    the temporaries of a process killed while publishing. Only the holder of the entry's lock (or
    gc's exclusive lease) calls this. With a `deadline` (monotonic), stop there and return False:
    the rest is an unmarked directory, which the next start or gc removes."""
    if fs.remove_file(entry.marker):
        fs.fsync_dir(entry.root)
    fs.remove_file(entry.manifest)
    for path in entry.root.glob(f".{entry.name}.*.tmp"):
        fs.remove_file(path, empty_dir_too=True)
    try:
        if not os.path.isdir(entry.prefix) or os.path.islink(entry.prefix):
            fs.remove_file(entry.prefix)
            return True
        return fs.remove_tree(str(entry.prefix), deadline)
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename and exc.filename != str(entry.prefix) else ""
        raise ConfigError(
            f"cannot remove the cache entry {entry.prefix} to unpack it again ({exc.strerror}{where})",
            f"remove it by hand (rm -rf '{entry.prefix}', after chattr -i of any immutable file) and try again",
        ) from exc


def abandon(entry: Entry, deadline: float) -> str:
    """After the process unpacking `entry` was ended: remove what it left. "published" if it had
    published the entry (kept), "removed", "left" (past the deadline, unmarked), or "taken" when
    another process holds the lock now (it removes the rest itself)."""
    from filelock import FileLock, Timeout

    lock = FileLock(entry.lock)
    try:
        lock.acquire(timeout=0)
    except (Timeout, OSError):
        return "taken"
    try:
        if read_marker(entry) is not None:
            return "published"
        return "removed" if discard(entry, deadline) else "left"
    except ConfigError:
        return "left"
    finally:
        lock.release()
