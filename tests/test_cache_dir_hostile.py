"""A cache directory holding what the cache never makes there (a shared place's own files, planted
symlinks, directories or FIFOs at the cache's names): nothing outside the cache is written or
removed, and what cannot be repaired safely is one line (exit 2), never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from archives import entry_name
from support import entry_env, run_entrypoint, unavailable

OLD = time.time() - 86400 * 30


def unpack(tarball: Path, cache: Path, **settings: str) -> tuple[int, str, str]:
    proc = run_entrypoint(["unpack"], entry_env(MLSERVER_ENV_TARBALL=tarball, MLSERVER_ENV_CACHE_DIR=cache, **settings))
    return proc.returncode, proc.stdout, proc.stderr


def gc(cache: Path, *args: str) -> tuple[int, str, str]:
    proc = run_entrypoint(["gc", *args], entry_env(MLSERVER_ENV_CACHE_DIR=cache))
    return proc.returncode, proc.stdout, proc.stderr


def canary(tmp_path: Path) -> Path:
    """A directory outside the cache with an old file in it, which nothing may change."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "id_ed25519").write_text("k\n")
    os.utime(outside / "id_ed25519", (OLD, OLD))
    return outside


def untouched(outside: Path) -> bool:
    files = sorted(p.name for p in outside.iterdir())
    f = outside / "id_ed25519"
    return files == ["id_ed25519"] and f.read_text() == "k\n" and abs(f.stat().st_mtime - OLD) < 1


def test_gc_removes_nothing_in_keys_it_did_not_name(tmp_path: Path) -> None:
    """A cache directory pointed at a shared place whose `.keys` is someone else's: only names
    the memo writer produces (16 hex digits, and their temporaries) are gc's to remove."""
    keys = tmp_path / "shared" / ".keys"
    keys.mkdir(parents=True)
    for name in ("id_ed25519", "0a1b2c3d4e5f6a7b.bak", "notes.tmp", "0A1B2C3D4E5F6A7B"):
        (keys / name).write_text("k\n")
        os.utime(keys / name, (OLD, OLD))
    ours = keys / "0a1b2c3d4e5f6a7b"
    ours.write_text("{not json")
    os.utime(ours, (OLD, OLD))
    code, _, err = gc(tmp_path / "shared")
    assert code == 0, err
    left = sorted(p.name for p in keys.iterdir())
    assert left == ["0A1B2C3D4E5F6A7B", "0a1b2c3d4e5f6a7b.bak", "id_ed25519", "notes.tmp"]  # the garbage memo went


def test_symlinked_keys_is_never_written_or_swept(small_tarball: Path, tmp_path: Path) -> None:
    """`.keys` a symlink to a directory outside: neither a start (which sweeps with a size bound
    set) nor gc deletes old files there, and no memo is written there; a warning says so."""
    outside = canary(tmp_path)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / ".keys").symlink_to(outside)
    code, _, err = unpack(small_tarball, cache, MLSERVER_ENV_CACHE_MAX_BYTES="100GB")
    assert code == 0, err
    assert "is a symbolic link or not a directory" in err
    code, _, err = gc(cache)
    assert code == 0, err
    assert f"{cache / '.keys'} is a symbolic link" in err
    assert untouched(outside)
    code, _, err = unpack(small_tarball, cache)  # still works, hashing again
    assert code == 0 and "cache hit" in err, err


def test_keys_that_is_a_file_is_left_alone(small_tarball: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / ".keys").write_text("mine")
    code, _, err = unpack(small_tarball, cache)
    assert code == 0 and "is a symbolic link or not a directory" in err, err  # was silent
    code, _, err = gc(cache)
    assert code == 0, err
    assert (cache / ".keys").read_text() == "mine"


def test_memo_temporary_is_created_exclusively_never_through_a_symlink(small_tarball: Path, tmp_path: Path) -> None:
    """As a container's PID 1 the old temporary `<memo>.1.tmp` was predictable: a symlink planted
    under that name had its target truncated and rewritten. Every name a pid could give is planted."""
    outside = canary(tmp_path)
    cache = tmp_path / "cache"
    keys = cache / ".keys"
    keys.mkdir(parents=True)
    import zlib

    raw = str(small_tarball.resolve()).encode()
    memo = f"{zlib.crc32(raw):08x}{zlib.adler32(raw):08x}"
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text()) if os.path.exists("/proc/sys/kernel/pid_max") else 4096
    for pid in range(1, min(pid_max, 1 << 16)):
        (keys / f"{memo}.{pid}.tmp").symlink_to(outside / "id_ed25519")
    code, _, err = unpack(small_tarball, cache)
    assert code == 0, err
    assert untouched(outside)
    assert json.loads((keys / memo).read_text())["path"] == str(small_tarball.resolve())


@pytest.mark.parametrize("target", ["dangling", "existing"])
def test_a_symlink_planted_as_use_is_never_followed(small_tarball: Path, tmp_path: Path, target: str) -> None:
    """`<key8>.use` a symlink: O_CREAT created a dangling one's target outside the cache, and the
    start's utime (last used) changed an existing target's mtime. Now one line, nothing followed,
    by a cold start, a warm one and gc alike."""
    outside = canary(tmp_path)
    cache = tmp_path / "cache"
    cache.mkdir()
    use = cache / f"{entry_name(small_tarball)}.use"
    pointed = outside / ("created" if target == "dangling" else "id_ed25519")

    def plant() -> None:
        use.unlink(missing_ok=True)
        use.symlink_to(pointed)

    plant()
    code, _, err = unpack(small_tarball, cache)
    assert code == 2 and f"{use} is a symbolic link" in error_line(err), err
    assert untouched(outside)
    use.unlink()
    code, _, err = unpack(small_tarball, cache)  # unpacked
    assert code == 0, err
    plant()
    code, _, err = unpack(small_tarball, cache)  # warm: the fast path declines, the full path says why
    assert code == 2 and f"{use} is a symbolic link" in error_line(err), err
    code, _, err = gc(cache, "--max-age", "0")
    assert code == 2 and f"{use} is a symbolic link" in error_line(err), err
    assert untouched(outside)


def test_a_directory_as_use_is_one_line(small_tarball: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    use = cache / f"{entry_name(small_tarball)}.use"
    use.mkdir(parents=True)
    code, _, err = unpack(small_tarball, cache)
    assert code == 2 and f"{use} is a directory" in error_line(err), err
    code, _, err = gc(cache, "--max-age", "0")
    assert code == 2 and f"{use} is a directory" in error_line(err), err


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("mlserver-entrypoint: error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def _plant(case: str, cache: Path, k: str, outside: Path) -> None:
    if case == "ready is a directory":
        (cache / f"{k}.ready").mkdir()
    elif case == "manifest is a directory":
        (cache / f"{k}.manifest").unlink()
        (cache / f"{k}.manifest").mkdir()
    elif case in ("stale temporary directory", "temporary directory with files"):
        (cache / f".{k}.ready.99.tmp").mkdir()
        if case == "temporary directory with files":
            (cache / f".{k}.ready.99.tmp" / "x").write_text("x")
    elif case == "lock is a directory":
        (cache / f"{k}.lock").mkdir()
    elif case == "lock is a symlink":
        (cache / f"{k}.lock").symlink_to(outside / "created")
    elif case == "FIFO at the entry":
        os.mkfifo(cache / k)


HOSTILE = {  # case: (unpacked first, what the start says: None is a repair and a success)
    "ready is a directory": (False, "{k}.ready is a directory"),
    "manifest is a directory": (True, "{k}.manifest is a directory"),
    "stale temporary directory": (False, None),
    "temporary directory with files": (False, ".{k}.ready.99.tmp is a directory"),
    "lock is a directory": (False, "{k}.lock is a directory"),
    "lock is a symlink": (False, "{k}.lock is a symbolic link"),
    "FIFO at the entry": (False, None),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_what_the_cache_never_makes_at_its_names_is_one_line_or_repaired(
    small_tarball: Path, tmp_path: Path, case: str
) -> None:
    """Each was a traceback (exit 1), and the cache stayed stuck for every later start."""
    outside = canary(tmp_path)
    cache = tmp_path / "cache"
    cache.mkdir()
    k = entry_name(small_tarball)
    first, says = HOSTILE[case]
    if first:
        assert unpack(small_tarball, cache)[0] == 0
    _plant(case, cache, k, outside)
    code, out, err = unpack(small_tarball, cache)
    if says is None:
        assert code == 0 and Path(out.splitlines()[-1]) == cache / k, err
        assert not (cache / f".{k}.ready.99.tmp").exists()
    else:
        line = error_line(err)
        assert code == 2 and str(cache / says.format(k=k)) in line and "remove it" in line, err
    assert untouched(outside)


def test_an_entry_that_cannot_be_removed_is_one_line(small_tarball: Path, tmp_path: Path) -> None:
    """A damaged entry holding an immutable file: PermissionError's traceback, at every start."""
    cache = tmp_path / "cache"
    assert unpack(small_tarball, cache)[0] == 0
    k = entry_name(small_tarball)
    stuck = cache / k / "stuck"
    stuck.write_text("")  # damage: the quick check sees the prefix's mtime changed
    if subprocess.run(["chattr", "+i", str(stuck)], capture_output=True).returncode != 0:
        unavailable("chattr +i is not possible here")
    try:
        code, _, err = unpack(small_tarball, cache)
        line = error_line(err)
        assert code == 2 and f"cannot remove the cache entry {cache / k}" in line and "chattr -i" in line, err
    finally:
        subprocess.run(["chattr", "-i", str(stuck)], check=True)


def test_gc_with_a_directory_as_a_marker_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "11111111.ready").mkdir()
    code, _, err = gc(tmp_path)
    assert code == 2 and f"{tmp_path / '11111111.ready'} is a directory" in error_line(err), err


def test_marker_temporary_is_never_written_through_a_symlink(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`.<key8>.ready.<pid>.tmp` was opened by a predictable name, following a symlink there
    (planted while an unpack runs, after its discard): its target was truncated and rewritten."""
    from entrypoint import fs

    outside = canary(tmp_path)
    root = tmp_path / "cache"
    root.mkdir()
    marker = root / "0123abcd.ready"
    (root / f".{marker.name}.{os.getpid()}.tmp").symlink_to(outside / "id_ed25519")
    fs.write_atomic(marker, b"{}")
    assert marker.read_bytes() == b"{}" and untouched(outside)
    # The name guessed after all (its random part fixed here): O_EXCL and O_NOFOLLOW still refuse it.
    monkeypatch.setattr(os, "urandom", lambda n: b"\x01" * n)
    (root / f".{marker.name}.{os.getpid()}.{'01' * 8}.tmp").symlink_to(outside / "id_ed25519")
    with pytest.raises(FileExistsError):
        fs.write_atomic(marker, b"{...}")
    assert marker.read_bytes() == b"{}" and untouched(outside)


def test_memo_temporary_guessed_is_still_not_followed(
    small_tarball: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from entrypoint import keys

    outside = canary(tmp_path)
    root = tmp_path / "cache"
    memo = keys.memo_path(root, small_tarball)
    memo.parent.mkdir(parents=True)
    monkeypatch.setattr(os, "urandom", lambda n: b"\x02" * n)
    (memo.parent / f"{memo.name}.{os.getpid()}.{'02' * 8}.tmp").symlink_to(outside / "id_ed25519")
    keys.remember(root, small_tarball, (), "blake3", "ab" * 32)  # best effort: nothing written
    assert untouched(outside) and not memo.exists()


def test_a_remembered_key_that_is_no_digest_is_not_used(small_tarball: Path, tmp_path: Path) -> None:
    """The entry's name is taken from the key: a memo saying "../esc…" put the entry, its lock,
    marker and manifest beside the cache directory, and the start served from there."""
    cache = tmp_path / "cache"
    code, out, err = unpack(small_tarball, cache)
    assert code == 0, err
    memo = cache / ".keys" / _memo_name(small_tarball)
    memo.write_text(json.dumps({**json.loads(memo.read_text()), "blake3": "../escXX" + "0" * 56}))
    for _ in range(2):  # the first start hashes again and remembers the real key; the second uses it
        code, again, err = unpack(small_tarball, cache)
        assert code == 0 and again == out, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_what_stands_for_the_marker_or_manifest_is_never_followed_nor_blocks(
    small_tarball: Path, tmp_path: Path
) -> None:
    """A FIFO at `<key8>.manifest` hung VERIFY=full forever (quick mode repaired it), and a
    symlink at `.ready` to a valid copy was read and served: both are damage, unpacked again."""
    cache = tmp_path / "cache"
    code, out, err = unpack(small_tarball, cache)
    assert code == 0, err
    k = entry_name(small_tarball)
    outside = tmp_path / "outside"
    outside.mkdir()
    for verify in ("full", "quick"):
        (cache / f"{k}.manifest").unlink()
        os.mkfifo(cache / f"{k}.manifest")
        code, again, err = unpack(small_tarball, cache, MLSERVER_ENV_VERIFY=verify)  # run_entrypoint's timeout: no hang
        assert code == 0 and again == out and "extract:" in err, err
        assert (cache / f"{k}.manifest").is_file()
    copy = outside / "copy.ready"
    copy.write_bytes((cache / f"{k}.ready").read_bytes())
    (cache / f"{k}.ready").unlink()
    (cache / f"{k}.ready").symlink_to(copy)
    code, again, err = unpack(small_tarball, cache)
    assert code == 0 and again == out and "extract:" in err, err
    assert not (cache / f"{k}.ready").is_symlink() and copy.is_file()


def test_a_bloated_manifest_is_read_in_linear_time_and_bounded_memory(tmp_path: Path) -> None:
    """A garbage manifest with no `--` line: _quick_section appended block after block and searched
    the whole buffer each time (100 MB: 86 s, 232 MB RSS). Now at most a few MB are read."""
    import tracemalloc

    from entrypoint import manifest
    from entrypoint.entry import Entry

    entry = Entry(tmp_path, "ab" * 32)
    entry.prefix.mkdir()
    with open(entry.manifest, "wb") as f:
        for _ in range(40):
            f.write((b"x" * 1023 + b"\n") * 1024)  # 40 MiB of lines, none `--`
    tracemalloc.start()
    t0 = time.monotonic()
    try:
        problem = manifest.verify(entry, full=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert problem == "its manifest is damaged"
    assert time.monotonic() - t0 < 5 and peak < 16 << 20, (time.monotonic() - t0, peak)


def test_a_bloated_marker_is_damage_not_read_whole(small_tarball: Path, tmp_path: Path) -> None:
    """A valid marker padded to megabytes was read whole and served (300 MB: 600 MB RSS): no real
    marker is more than a few KB, so a bigger one is damage and the entry is unpacked again."""
    cache = tmp_path / "cache"
    code, _, err = unpack(small_tarball, cache)
    assert code == 0, err
    marker = cache / f"{entry_name(small_tarball)}.ready"
    record = json.loads(marker.read_text())
    marker.write_text(json.dumps({**record, "padding": "x" * (4 << 20)}))
    code, _, err = unpack(small_tarball, cache)
    assert code == 0 and "extract:" in err and "cache hit" not in err, err
    assert marker.stat().st_size < 4096


def _memo_name(tarball: Path) -> str:
    import zlib

    raw = str(tarball.resolve()).encode()
    return f"{zlib.crc32(raw):08x}{zlib.adler32(raw):08x}"


def test_memos_are_not_read_through_a_symlinked_keys(small_tarball: Path, tmp_path: Path) -> None:
    """A `.keys` symlink is not the cache's own: a memo there named another content's key, and the
    start unpacked this tarball under that key's name."""
    outside = tmp_path / "outside"
    outside.mkdir()
    st = small_tarball.resolve().stat()
    identity = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    (outside / _memo_name(small_tarball)).write_text(json.dumps({"identity": identity, "blake3": "ab" * 32}))
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / ".keys").symlink_to(outside)
    for _ in range(2):  # cold, then warm
        code, out, err = unpack(small_tarball, cache)
        assert code == 0 and Path(out.splitlines()[-1]) == cache / entry_name(small_tarball), err
    assert not (cache / "abababab").exists()


def test_a_bloated_memo_is_not_read(small_tarball: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    assert unpack(small_tarball, cache)[0] == 0
    memo = cache / ".keys" / _memo_name(small_tarball)
    memo.write_text(json.dumps({**json.loads(memo.read_text()), "padding": "x" * (1 << 20)}))
    code, _, err = unpack(small_tarball, cache)
    assert code == 0 and "key hashed" in err, err
    assert memo.stat().st_size < 4096  # written again
