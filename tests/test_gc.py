"""Cache garbage collection (issue 7): oldest-used first, by age and size, never an entry a live
process uses, and that protection ends with the process, even on kill -9."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from support import ENTRYPOINT, REPO, entry_env, error_line, run_entrypoint, unavailable

DAY = 86400
ENTRY = re.compile(r"[0-9a-f]{8}")


@pytest.fixture
def tarballs(small_tarball: Path, tmp_path: Path) -> list[Path]:
    """Three archives of different content (trailing zeros after the gzip stream), same environment."""
    data = small_tarball.read_bytes()
    out = []
    for i in range(3):
        path = tmp_path / f"v{i}.tar.gz"
        path.write_bytes(data + b"\0" * 1024 * i)
        out.append(path)
    return out


def unpack(tarball: Path, cache: Path, **settings: str) -> subprocess.CompletedProcess[str]:
    proc = run_entrypoint(["unpack"], entry_env(MLSERVER_ENV_TARBALL=tarball, MLSERVER_ENV_CACHE_DIR=cache, **settings))
    assert proc.returncode == 0, proc.stderr
    return proc


def prefix_of(proc: subprocess.CompletedProcess[str]) -> Path:
    return Path(proc.stdout.splitlines()[-1])


def age(prefix: Path, days: float) -> None:
    """Make an entry look last used `days` ago (its start touched `.use`, its unpack wrote `.ready`)."""
    t = time.time() - days * DAY
    for suffix in (".use", ".ready"):
        os.utime(prefix.with_name(prefix.name + suffix), (t, t))


def gc(cache: Path, *args: str) -> dict[str, str]:
    """Run `gc`; {entry prefix: action} from its report."""
    proc = run_entrypoint(["gc", *args], entry_env(MLSERVER_ENV_CACHE_DIR=cache))
    assert proc.returncode == 0, proc.stderr
    actions = {}
    for line in proc.stdout.splitlines()[:-1]:
        action, rest = line[:13].strip(), line[13:]
        actions[rest.split()[0]] = action
    return actions


def gone(prefix: Path) -> bool:
    return not any(prefix.parent.glob(prefix.name + "*"))


def test_gc_removes_oldest_unused_first_and_spares_a_running_process(tarballs: list[Path], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    a, b, c = (prefix_of(unpack(t, cache)) for t in tarballs)
    # A process started through the entrypoint on A: the exec'd interpreter holds A from now on.
    holder = subprocess.Popen(
        [*ENTRYPOINT, "python", "-c", "import sys; print('up', flush=True); sys.stdin.read()"],
        env=entry_env(MLSERVER_ENV_TARBALL=tarballs[0], MLSERVER_ENV_CACHE_DIR=cache),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=REPO, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "up\n"
        assert Path(os.readlink(f"/proc/{holder.pid}/exe")).is_relative_to(a)  # the exec'd process, same pid
        age(a, 10)  # A is the oldest, but in use
        age(b, 5)
        age(c, 2)
        unit = sum(f.stat().st_size for f in b.rglob("*") if f.is_file() and not f.is_symlink())
        bound = str(int(2.5 * unit))  # two entries fit, three do not

        planned = gc(cache, "--max-bytes", bound, "--dry-run")
        assert planned == {str(a): "in use", str(b): "would remove", str(c): "kept"}
        assert all((p / "bin" / "python").exists() for p in (a, b, c))

        assert gc(cache, "--max-bytes", bound) == {str(a): "in use", str(b): "removed", str(c): "kept"}
        assert gone(b) and (a / "bin" / "python").exists() and (c / "bin" / "python").exists()

        assert gc(cache, "--max-age", "3") == {str(a): "in use", str(c): "kept"}
        assert holder.poll() is None
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, the kernel drops its lock
        holder.wait()
    assert gc(cache, "--max-age", "3") == {str(a): "removed", str(c): "kept"}
    assert gone(a) and (c / "bin" / "python").exists()
    # The next start on A unpacks it again, as if it never was.
    assert "extract:" in unpack(tarballs[0], cache).stderr


def test_bound_at_start_never_removes_the_entry_being_started(tarballs: list[Path], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    a = prefix_of(unpack(tarballs[0], cache))
    second = unpack(tarballs[1], cache, MLSERVER_ENV_CACHE_MAX_BYTES="1")
    b = prefix_of(second)
    assert f"gc: removed {a} " in second.stderr and gone(a)
    assert json.loads(b.with_name(b.name + ".ready").read_text())["prefix"] == str(b)
    again = unpack(tarballs[1], cache, MLSERVER_ENV_CACHE_MAX_BYTES="1", MLSERVER_ENV_CACHE_MAX_AGE="0.0001")
    assert "cache hit" in again.stderr and "gc: removed" not in again.stderr


def test_bounds_apply_on_a_cache_hit_too(tarballs: list[Path], tmp_path: Path) -> None:
    """Every start applies MLSERVER_ENV_CACHE_MAX_*, however it writes them, not only a first one."""
    cache = tmp_path / "cache"
    a = prefix_of(unpack(tarballs[0], cache))
    b = prefix_of(unpack(tarballs[1], cache))
    for value in ("1", "1.5"):
        age(a, 30)
        hit = unpack(tarballs[1], cache, MLSERVER_ENV_CACHE_MAX_AGE=value)
        assert "cache hit" in hit.stderr and f"gc: removed {a} " in hit.stderr and gone(a)
        assert prefix_of(unpack(tarballs[0], cache)) == a
    for value in ("1", "1KiB"):
        hit = unpack(tarballs[1], cache, MLSERVER_ENV_CACHE_MAX_BYTES=value)
        assert "cache hit" in hit.stderr and f"gc: removed {a} " in hit.stderr and gone(a) and b.is_dir()
        assert prefix_of(unpack(tarballs[0], cache)) == a


def test_partial_entry_is_kept_while_unpacking_and_removed_once_its_process_is_killed(
    tarballs: list[Path], tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    for _ in range(10):  # frozen mid-extraction: alive, holding its entry; tried again if it got further
        shutil.rmtree(cache, ignore_errors=True)
        proc = subprocess.Popen(
            [*ENTRYPOINT, "unpack"],
            env=entry_env(MLSERVER_ENV_TARBALL=tarballs[0], MLSERVER_ENV_CACHE_DIR=cache),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO,
        )  # fmt: skip
        while not (entries := [p for p in cache.glob("*") if ENTRY.fullmatch(p.name)]) and proc.poll() is None:
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGSTOP)
        if proc.poll() is None and not list(cache.glob("*.ready")):
            break
        proc.kill()
        proc.wait()
    else:
        raise AssertionError("10 starts in a row published before they could be stopped")
    try:
        (partial,) = entries
        assert gc(cache) == {str(partial): "in use"}
        assert partial.is_dir()
    finally:
        proc.kill()
        proc.wait()
    assert gc(cache, "--dry-run") == {str(partial): "would remove"}
    assert gc(cache) == {str(partial): "removed"} and gone(partial)


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    for args in (["--max-bytes", "lots"], ["--max-age", "old"], ["--max-age", "-1"], ["--force"]):
        proc = run_entrypoint(["gc", *args], entry_env(MLSERVER_ENV_CACHE_DIR=tmp_path))
        assert proc.returncode == 2 and proc.stderr.startswith("mlserver-entrypoint: error:"), proc.stderr
    for flag in ("--max-bytes", "--max-age"):  # the value left out: said so, not "--max-bytes : not a size"
        proc = run_entrypoint(["gc", flag], entry_env(MLSERVER_ENV_CACHE_DIR=tmp_path))
        assert proc.returncode == 2 and f"error: {flag} needs a value, e.g. {flag} " in proc.stderr, proc.stderr


def test_gc_removes_key_memos_a_killed_start_left_half_written(tmp_path: Path) -> None:
    keys = tmp_path / ".keys"
    keys.mkdir()
    stale, fresh = keys / "0a1b2c3d4e5f6a7b.111.tmp", keys / "0a1b2c3d4e5f6a7b.222.tmp"
    for path in (stale, fresh):
        path.write_text('{"sha')
    os.utime(stale, (time.time() - 120, time.time() - 120))
    gc(tmp_path, "--dry-run")
    assert stale.exists()  # a dry run changes nothing
    gc(tmp_path)
    assert not stale.exists() and fresh.exists()  # a start may be writing the fresh one right now


def test_gc_drops_key_memos_whose_entry_is_gone(tarballs: list[Path], tmp_path: Path) -> None:
    """One memo per tarball path ever used would pile up for good: gc keeps those that still lead
    to an entry, and any a start may have just written."""
    cache = tmp_path / "cache"
    old, kept = (prefix_of(unpack(t, cache)) for t in tarballs[:2])
    memos = {json.loads(p.read_text())["blake3"][:8]: p for p in (cache / ".keys").iterdir()}
    assert sorted(memos) == sorted([old.name, kept.name])
    garbage, fresh = cache / ".keys" / "00000000ffffffff", cache / ".keys" / "11111111eeeeeeee"
    garbage.write_text("{not json")
    fresh.write_text(json.dumps({"path": "/elsewhere.tar.gz", "identity": [], "blake3": "ab" * 32}))
    minutes_ago = time.time() - 120
    for path in (*memos.values(), garbage):
        os.utime(path, (minutes_ago, minutes_ago))
    age(old, 30)
    gc(cache, "--max-age", "1", "--dry-run")
    assert all(p.exists() for p in (*memos.values(), garbage, fresh))  # a dry run changes nothing
    assert gc(cache, "--max-age", "1") == {str(old): "removed", str(kept): "kept"}
    assert not memos[old.name].exists() and not garbage.exists()
    assert memos[kept.name].exists() and fresh.exists()
    assert "cache hit" in unpack(tarballs[1], cache).stderr


def test_an_entry_whose_marker_names_its_key_sha256_is_used_and_kept(small_tarball: Path, tmp_path: Path) -> None:
    """0.1.0's markers name the key "sha256" only, and it reads nothing else. A pinned tarball's
    key is still its SHA-256: a start finds its entry there, and gc keeps it as a whole entry
    rather than removing it as a partial one."""
    import hashlib

    cache = tmp_path / "cache"
    pin = hashlib.sha256(small_tarball.read_bytes()).hexdigest()
    prefix = prefix_of(unpack(small_tarball, cache, MLSERVER_ENV_TARBALL_SHA256=pin))
    marker = prefix.with_name(prefix.name + ".ready")
    record = json.loads(marker.read_text())
    assert record["sha256"] == record["key"] == pin  # where 0.1.0 reads the key from, and where it reads it now
    del record["key"]
    marker.write_text(json.dumps(record))
    warm = unpack(small_tarball, cache, MLSERVER_ENV_TARBALL_SHA256=pin)
    assert "cache hit" in warm.stderr and "unusable" not in warm.stderr, warm.stderr
    assert gc(cache) == {str(prefix): "kept"}


def test_names_like_entries_that_are_not_ours_are_never_touched(tarballs: list[Path], tmp_path: Path) -> None:
    """A cache directory pointed at a shared place (/tmp, the models folder) may hold someone
    else's 8-hex-digit names: without an entry's own files beside them, they are not ours."""
    cache = tmp_path / "shared"
    (cache / "cafebabe").mkdir(parents=True)
    (cache / "cafebabe" / "important.txt").write_text("precious")
    (cache / "deadbeef").write_text("x")
    ours = prefix_of(unpack(tarballs[0], cache))
    age(ours, 30)
    unpack(tarballs[1], cache, MLSERVER_ENV_CACHE_MAX_AGE="1")  # removes the old entry only
    assert gone(ours)
    assert (cache / "cafebabe" / "important.txt").read_text() == "precious" and (cache / "deadbeef").read_text() == "x"
    assert str(cache / "cafebabe") not in gc(cache, "--max-bytes", "1")
    assert (cache / "cafebabe" / "important.txt").exists() and (cache / "deadbeef").exists()


def test_max_age_zero_removes_every_unused_entry(tarballs: list[Path], tmp_path: Path) -> None:
    """0 days, from the command line or the setting: every entry no running process holds."""
    cache = tmp_path / "cache"
    a = prefix_of(unpack(tarballs[0], cache))
    b = prefix_of(unpack(tarballs[1], cache, MLSERVER_ENV_CACHE_MAX_AGE="0"))
    assert gone(a) and b.is_dir()  # the start's own entry is held while it starts
    assert gc(cache, "--max-age", "0") == {str(b): "removed"}


def test_output_cut_short_by_its_reader_is_no_traceback(tarballs: list[Path], tmp_path: Path) -> None:
    """`gc --dry-run | head -1`: the reader closes the pipe; the exit is a quiet SIGPIPE status."""
    cache = tmp_path / "cache"
    unpack(tarballs[0], cache)
    read, write = os.pipe()
    os.close(read)  # every write now fails with EPIPE
    try:
        proc = subprocess.run(
            [*ENTRYPOINT, "gc", "--dry-run"], env=entry_env(MLSERVER_ENV_CACHE_DIR=cache),
            stdout=write, stderr=subprocess.PIPE, text=True, timeout=120, cwd=REPO,
        )  # fmt: skip
    finally:
        os.close(write)
    assert proc.returncode == 141 and "Traceback" not in proc.stderr, proc.stderr


def test_output_to_a_full_disk_is_one_line(tarballs: list[Path], tmp_path: Path) -> None:
    """`unpack > /volume/prefix` on a full disk (/dev/full here): unpack, inspect and gc printed
    an OSError traceback and exited 1; now one line saying stdout could not be written."""
    if not os.path.exists("/dev/full"):
        unavailable("no /dev/full")
    cache = tmp_path / "cache"
    unpack(tarballs[0], cache)
    env = entry_env(MLSERVER_ENV_TARBALL=tarballs[0], MLSERVER_ENV_CACHE_DIR=cache)
    for args in (["unpack"], ["inspect", "--json"], ["gc", "--dry-run"], ["--version"]):
        with open("/dev/full", "w") as full:
            proc = subprocess.run(
                [*ENTRYPOINT, *args], env=env, stdout=full, stderr=subprocess.PIPE, text=True, timeout=120, cwd=REPO
            )
        assert proc.returncode == 1, (args, proc.stderr)
        assert "cannot write to standard output: No space left on device" in error_line(proc), (args, proc.stderr)


def test_closed_stdout_is_one_line_not_a_silent_success(tarballs: list[Path], tmp_path: Path) -> None:
    """`unpack >&-`: the prefix, stdout's last line by contract, was lost and the exit 0."""
    cache = tmp_path / "cache"
    env = entry_env(MLSERVER_ENV_TARBALL=tarballs[0], MLSERVER_ENV_CACHE_DIR=cache)
    for args in (["unpack"], ["unpack"], ["gc", "--dry-run"]):  # cold, then a warm hit
        proc = subprocess.run(
            ["sh", "-c", '"$@" >&-', "sh", *ENTRYPOINT, *args],
            env=env, stderr=subprocess.PIPE, text=True, timeout=120, cwd=REPO,
        )  # fmt: skip
        assert proc.returncode == 1, (args, proc.stderr)
        assert "standard output is closed" in error_line(proc), (args, proc.stderr)


def test_a_cache_dir_that_is_a_file_is_one_line(tmp_path: Path) -> None:
    """MLSERVER_ENV_CACHE_DIR naming a file (a typo, /dev/null): gc printed NotADirectoryError's
    traceback and exited 1."""
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    for args in (["gc"], ["gc", "--dry-run"], ["gc", "--max-age", "0"]):
        proc = run_entrypoint(args, entry_env(MLSERVER_ENV_CACHE_DIR=not_a_dir))
        assert proc.returncode == 2, (args, proc.stderr)
        assert f"cache directory {not_a_dir} is not a directory" in error_line(proc), (args, proc.stderr)


def test_gc_on_a_cache_mounted_read_only_says_so_and_a_dry_run_lists(small_tarball: Path, tmp_path: Path) -> None:
    """The server container's view of a shared cache (a volume mounted readOnly): gc can remove
    nothing there and says so in one line; --dry-run still lists. Both were tracebacks (EROFS)."""
    cache = tmp_path / "c"
    prefix = prefix_of(unpack(small_tarball, cache))
    if subprocess.run(["mount", "--bind", str(cache), str(cache)], capture_output=True).returncode != 0:
        unavailable("cannot bind-mount here")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(cache)], check=True)
        proc = run_entrypoint(["gc", "--max-age", "0"], entry_env(MLSERVER_ENV_CACHE_DIR=cache))
        line = error_line(proc)
        assert proc.returncode == 2 and "read-only" in line and str(cache) in line, proc.stderr
        assert gc(cache, "--max-age", "0", "--dry-run") == {str(prefix): "would remove"}
    finally:
        subprocess.run(["umount", str(cache)], check=True)
    assert not gone(prefix)
