"""Cache garbage collection: drop entries by age and total size, oldest used first, never one in
use (lease.py), and partial entries no process holds."""

from __future__ import annotations

import contextlib
import os
import re
import time
from pathlib import Path
from typing import Any, NamedTuple

from entrypoint import entry as entries
from entrypoint import fs, keys, lease, log, settings
from entrypoint.entry import Entry
from entrypoint.errors import ConfigError

DAY = 86400.0
# An entry is ours only with one of its own files beside it: a bare 8-hex-digit name in a cache
# directory pointed at a shared place (/tmp, the models folder) is someone else's.
NAME = re.compile(rf"([0-9a-f]{{{entries.KEY_CHARS}}})\.({'|'.join(entries.FILES)})")


class Item(NamedTuple):
    entry: Entry
    complete: bool
    size: int  # bytes, as recorded at unpack (complete) or counted now
    last_used: float  # epoch seconds


def scan(root: Path) -> list[Item]:
    """Every entry in the cache (complete, partial or just leftover lock files), oldest used first."""
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    except NotADirectoryError as exc:
        raise ConfigError(
            f"cache directory {root} is not a directory", "set MLSERVER_ENV_CACHE_DIR to the cache's directory"
        ) from exc
    except PermissionError as exc:
        raise ConfigError(
            f"cache directory {root} cannot be listed by uid {os.getuid()}",
            "run gc as the cache's owner, or set MLSERVER_ENV_CACHE_DIR to a cache this user may read",
        ) from exc
    items = [_item(Entry(root, key8)) for key8 in sorted(_ours(names))]
    return sorted(items, key=lambda i: i.last_used)


def _ours(names: list[str]) -> set[str]:
    return {m[1] for n in names if (m := NAME.fullmatch(n))}


def _item(entry: Entry) -> Item:
    record = entries.read_marker(entry, key_prefix_only=True)
    if record is not None:
        entry = Entry(entry.root, str(entries.marker_key(record)))
    size = record.get("bytes") if record else None
    # Last used: the start that touched `.use`, or the unpack that wrote the marker; for a partial
    # entry, when it was begun.
    times = [t for p in (entry.use, entry.marker) if (t := _mtime(p)) is not None]
    times = times or [t for p in (entry.prefix, entry.lock) if (t := _mtime(p)) is not None]
    return Item(
        entry, record is not None, size if isinstance(size, int) else _du(entry.prefix), max(times, default=0.0)
    )


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
    """Remove entries unused for `max_age_days`, then the oldest used until the rest fit
    `max_bytes`; entries in use are kept and still count."""
    items = scan(root)
    total = sum(i.size for i in items)
    out = []
    for item in items:
        reason = _reason(item, total, max_bytes, max_age_days)
        if not reason:
            out.append(Outcome(item, "kept", ""))
            continue
        with lease.exclusive(item.entry, create=not dry_run) as free:
            if not free:
                out.append(Outcome(item, "in use", reason))
                continue
            if not dry_run:
                entries.discard(item.entry)
                for path in (item.entry.lock, item.entry.use):
                    fs.remove_file(path)
        total -= item.size
        out.append(Outcome(item, "would remove" if dry_run else "removed", reason))
    if not dry_run:
        with contextlib.suppress(OSError):
            keys.sweep(root, _ours(os.listdir(root)))
    return out


def _reason(item: Item, total: int, max_bytes: int | None, max_age_days: float | None) -> str:
    unused = time.time() - item.last_used
    if not item.complete:
        return "incomplete"
    if max_age_days is not None and unused > max_age_days * DAY:
        return f"unused for {unused / DAY:.1f} days"
    if max_bytes is not None and total > max_bytes:
        return f"cache over {max_bytes} bytes"
    return ""


def at_start(config: settings.Settings) -> None:
    """MLSERVER_ENV_CACHE_MAX_BYTES / _MAX_AGE, applied once a start holds its own entry, so that
    one is never removed; a start never fails over housekeeping."""
    if config.cache_max_bytes is None and config.cache_max_age is None:
        return
    try:
        outcomes = collect(config.cache_dir, config.cache_max_bytes, config.cache_max_age, dry_run=False)
    except (OSError, ConfigError) as exc:
        log.info(f"gc: skipped ({exc})")
        return
    for o in outcomes:
        if o.action == "removed":
            log.info(f"gc: removed {o.item.entry.prefix} ({o.item.size / 1e6:.0f} MB, {o.reason})")


USAGE = "gc [--max-bytes N] [--max-age DAYS] [--dry-run]"
FLAGS = {"--max-bytes": ("cache_max_bytes", "20GiB"), "--max-age": ("cache_max_age", "7")}


def main(args: list[str]) -> int:
    """`gc`: the bounds default to the settings; the flags are read by the same rules."""
    config = settings.load()
    dry_run = False
    it = iter(args)
    for arg in it:
        flag, _, value = arg.partition("=")
        if arg == "--dry-run":
            dry_run = True
        elif flag in FLAGS:
            config = config._replace(**{FLAGS[flag][0]: _flag(flag, value or next(it, ""))})
        else:
            raise ConfigError(f"usage: {USAGE} (got {arg})")
    outcomes = collect(config.cache_dir, config.cache_max_bytes, config.cache_max_age, dry_run)
    _print(config.cache_dir, outcomes, dry_run)
    return 0


def _flag(flag: str, value: str) -> Any:
    name, example = FLAGS[flag]
    if not value:
        raise ConfigError(f"{flag} needs a value, e.g. {flag} {example}")
    try:
        return settings.check(name, value)
    except ValueError as exc:
        raise ConfigError(f"{flag} {value}: {exc}", f"give e.g. {flag} {example}") from exc


def _print(root: Path, outcomes: list[Outcome], dry_run: bool) -> None:
    for o in outcomes:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(o.item.last_used))
        why = f" ({o.reason})" if o.reason else ""
        log.out(f"{o.action:<13}{o.item.entry.prefix}  {o.item.size / 1e6:8.0f} MB  last used {used}{why}")
    gone = [o.item for o in outcomes if o.action in ("removed", "would remove")]
    kept = [o.item for o in outcomes if o.action in ("kept", "in use")]
    log.out(
        f"{root}: {'would free' if dry_run else 'freed'} {sum(i.size for i in gone) / 1e6:.0f} MB "
        f"in {len(gone)} entries; {sum(i.size for i in kept) / 1e6:.0f} MB in {len(kept)} entries kept"
    )
