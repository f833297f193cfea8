"""Bad input (issue 3): one clear error line, a non-zero exit, nothing cached.

Tarball path missing or unreadable; not an archive; truncated or corrupt; an environment without
a Python interpreter, or built for another OS or CPU; a cache directory that cannot be written;
a prefix too long for the environment's binary files; a SHA-256 pin that does not match. (An
environment without mlserver is in test_serve.py.)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from archives import (
    HOST_PYTHON,
    M,
    conda_pack_tiny,
    entry_name,
    tar_bytes,
    tiny_env,
    unpack_script_with,
    write_tar,
    xz_streams,
)
from filelock import FileLock
from support import ENTRYPOINT, REPO, entry_env, error_line, run_entrypoint, unavailable

NOBODY = 65534


def no_entries(cache: Path) -> bool:
    """Nothing published, nothing half-made: no .ready, no .manifest, no entry directory."""
    if not cache.exists():
        return True
    return not [p for p in cache.iterdir() if p.suffix in (".ready", ".manifest") or (p.is_dir() and p.name != ".keys")]


def start(tarball: Path | str, cache: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    env_ = entry_env(MLSERVER_ENV_TARBALL=tarball, MLSERVER_ENV_CACHE_DIR=cache, **env)
    return run_entrypoint(list(args) or ["unpack"], env_, timeout=120)  # a hang is a failure, not a stall


def refused(proc: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    assert proc.returncode == code, proc.stderr
    line = error_line(proc)
    for word in words:
        assert word in line, line
    return line


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A directory an unprivileged user can enter (pytest's own tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="mlenv-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def reachable_by_others(*paths: Path) -> Iterator[None]:
    """Search permission for others on the directories above `paths` while the block runs: a
    checkout cloned under `mktemp -d` (mode 0700) would hide the entrypoint and its venv from
    uid 65534. The modes are restored afterwards."""
    changed: dict[Path, int] = {}
    for path in paths:
        for d in Path(os.path.abspath(path)).parents:
            mode = d.stat().st_mode
            if d not in changed and not mode & stat.S_IXOTH:
                changed[d] = stat.S_IMODE(mode)
                d.chmod(changed[d] | stat.S_IXOTH)
    try:
        yield
    finally:
        for d, mode in changed.items():
            d.chmod(mode)


def as_nobody(*args: str, processes: int | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    """The entrypoint as uid/gid 65534 with no capabilities (we run as root: os.access says yes),
    with at most `processes` processes and threads of that uid."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        unavailable("needs root and setpriv to run the entrypoint as an unprivileged user")
    drop = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--inh-caps=-all"]
    if processes is not None:
        drop = ["prlimit", f"--nproc={processes}", *drop]
    with reachable_by_others(REPO / "entrypoint", Path(sys.executable)):
        return subprocess.run(
            [*drop, *ENTRYPOINT, *(list(args) or ["unpack"])],
            env=entry_env(HOME="/nonexistent", **env), capture_output=True, text=True, timeout=300, cwd=REPO,
        )  # fmt: skip


def test_no_process_or_thread_left_to_start_is_one_line(shared_tmp: Path) -> None:
    """At every point where a start forks or starts a thread, a process limit reached there ends it
    with one line that says so, not a traceback (and a limit high enough lets it through)."""
    tarball = shared_tmp / "env.tar.xz"  # of several streams: decoded on two threads, else one
    tarball.write_bytes(b"".join(xz_streams(tar_bytes(tiny_env(extra_files=20)), 4096)))
    said = []
    for processes in range(1, 12):
        cache = shared_tmp / f"c{processes}"
        cache.mkdir()
        os.chown(cache, NOBODY, NOBODY)
        proc = as_nobody(processes=processes, MLSERVER_ENV_TARBALL=str(tarball), MLSERVER_ENV_CACHE_DIR=str(cache))
        if proc.returncode == 0:
            break
        assert proc.returncode == 2, proc.stderr
        line = error_line(proc)
        assert "cannot start another process or thread" in line and "ulimit -u" in line, line
        said.append(line)
    assert proc.returncode == 0, proc.stderr
    assert any("fork" in line or "Resource temporarily unavailable" in line for line in said), said
    assert any("can't start new thread" in line for line in said), said


# --- The tarball ---------------------------------------------------------------------------------


def test_tarball_path_missing(tmp_path: Path) -> None:
    proc = start(tmp_path / "nowhere" / "env.tar.gz", tmp_path / "c")
    refused(proc, 2, "MLSERVER_ENV_TARBALL", "no such file", "nowhere/env.tar.gz")
    assert not (tmp_path / "c").exists()


def test_tarball_is_a_directory_or_a_fifo(tmp_path: Path) -> None:
    refused(start(tmp_path, tmp_path / "c"), 2, "not a regular file")
    fifo = tmp_path / "env.tar.gz"
    os.mkfifo(fifo)  # nobody writes to it: opening it for reading must not hang the start
    refused(start(fifo, tmp_path / "c"), 2, "not a regular file")
    assert no_entries(tmp_path / "c")


def test_tarball_unreadable(shared_tmp: Path) -> None:
    tarball = write_tar(shared_tmp / "env.tar.gz", tiny_env())
    tarball.chmod(0o600)  # root's only
    proc = as_nobody(MLSERVER_ENV_TARBALL=str(tarball), MLSERVER_ENV_CACHE_DIR=str(shared_tmp / "c"))
    refused(proc, 2, "not readable by uid 65534", str(tarball))
    assert no_entries(shared_tmp / "c")


def test_not_an_archive(tmp_path: Path) -> None:
    text = tmp_path / "environment.yml"
    text.write_text("name: old-sklearn\ndependencies:\n  - python=3.8\n" * 40)
    refused(start(text, tmp_path / "c"), 3, "not an archive", "environment.yml")
    assert no_entries(tmp_path / "c")


def test_a_big_file_that_is_no_archive_is_refused_before_it_is_hashed(tmp_path: Path) -> None:
    """A model file named by mistake: its first bytes say it is no archive. Hashing 64 GiB first
    (as before) takes minutes here; the timeout only catches that, it measures nothing."""
    model = tmp_path / "model.bin"
    with open(model, "wb") as f:
        f.truncate(64 << 30)  # sparse: nothing is written
    env_ = entry_env(MLSERVER_ENV_TARBALL=model, MLSERVER_ENV_CACHE_DIR=tmp_path / "c")
    refused(run_entrypoint(["unpack"], env_, timeout=30), 3, "not an archive", str(model), "MLSERVER_ENV_TARBALL")
    assert no_entries(tmp_path / "c") and not (tmp_path / "c" / ".keys").exists()


def test_truncated_real_tarball(small_tarball: Path, tmp_path: Path) -> None:
    cut = tmp_path / "bare.tar.gz"
    with open(small_tarball, "rb") as src:
        cut.write_bytes(src.read(small_tarball.stat().st_size * 2 // 5))
    refused(start(cut, tmp_path / "c"), 3, "corrupt or truncated", str(cut))
    assert no_entries(tmp_path / "c")


def test_corrupt_real_tarball(small_tarball: Path, tmp_path: Path) -> None:
    """Bytes flipped in the middle of the deflate stream: found by the codec or by gzip's CRC at
    the very end, after every file was written; either way the error is the archive's."""
    bad = tmp_path / "bare.tar.gz"
    data = bytearray(small_tarball.read_bytes())
    for at in range(len(data) // 2, len(data) // 2 + 64, 8):
        data[at] ^= 0xFF
    bad.write_bytes(bytes(data))
    refused(start(bad, tmp_path / "c"), 3, "corrupt", str(bad))
    assert no_entries(tmp_path / "c")


def test_environment_tar_gz_in_models_dir_that_is_no_file_is_an_error(tmp_path: Path) -> None:
    """MLSERVER_ENV_TARBALL unset and <models dir>/environment.tar.gz a dangling symlink (to a
    volume not mounted) or a directory: the start said "no environment tarball configured" and ran
    the command as is, so the image's own mlserver served the model with other libraries."""
    dangling, directory = tmp_path / "dangling", tmp_path / "directory"
    dangling.mkdir()
    (dangling / "environment.tar.gz").symlink_to(tmp_path / "volume-not-mounted" / "env.tar.gz")
    (directory / "environment.tar.gz").mkdir(parents=True)
    for models, why in ((dangling, "no such file"), (directory, "not a regular file")):
        env = entry_env(MLSERVER_MODELS_DIR=models, MLSERVER_ENV_CACHE_DIR=tmp_path / "c")
        for args in (["python", "-c", "print('ran')"], ["unpack"]):
            proc = run_entrypoint(args, env, timeout=60)
            assert proc.returncode == 2 and "ran" not in proc.stdout, proc.stderr
            line = error_line(proc)
            assert f"{models / 'environment.tar.gz'} (MLSERVER_ENV_TARBALL unset): {why}" in line, line
            assert "point it at" not in line  # it: the variable is unset


def test_error_after_progress_on_a_terminal_starts_its_own_line(tmp_path: Path) -> None:
    """On a terminal the unpack redraws one progress line with carriage returns; an archive
    refused past the 2 s the progress waits for printed its error glued to it
    ("extract:  92% (9984 files)mlserver-entrypoint: error: ..."). The entrypoint runs in a fork
    of this process with that wait at 0 s, so progress is drawn however fast the machine is."""
    import pty
    import select

    from entrypoint import cli, log

    many = [*tiny_env(), *(M(f"share/many/{i}") for i in range(25_000)), M("../escaped", data=b"x")]
    tarball = write_tar(tmp_path / "env.tar", many, fmt="tar")
    env = entry_env(MLSERVER_ENV_TARBALL=tarball, MLSERVER_ENV_CACHE_DIR=tmp_path / "c")
    pid, fd = pty.fork()
    if pid == 0:
        code = 70
        try:
            os.environ.clear()
            os.environ.update(env)
            sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 (the terminal pty.fork set up, not pytest's capture)
            sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
            log.Progress.QUIET_FOR = 0
            cli.main(["unpack"])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        finally:
            os._exit(code)
    out = b""
    with contextlib.suppress(OSError):  # EIO once the child is gone
        while select.select([fd], [], [], 120)[0] and (chunk := os.read(fd, 65536)):
            out += chunk
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    text = out.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 3, text
    assert "% (" in text, f"no progress drawn, the test proves nothing: {text}"
    error = [line for line in text.replace("\r\n", "\n").split("\n") if "error:" in line]
    assert len(error) == 1, text
    assert error[0].split("\r")[-1].removeprefix("\x1b[K").startswith("mlserver-entrypoint: error:"), text


def test_plain_log_progress_never_says_100_before_the_members_are_written(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The position is the archive's, read ahead by the decompressing thread: the seed logged
    "extract: 100% (14656 files)" and then "files 14871". Percentages stay below 100 while members
    are still coming, and count members, which is what is ticked."""
    from entrypoint import log

    monkeypatch.setattr(log.Progress, "QUIET_FOR", 0)
    progress = log.Progress("extract", 1000, lambda: 1000)  # all read already
    for _ in range(64 * 3):
        progress.tick()
    progress.done()
    lines = capfd.readouterr().err.splitlines()
    assert lines and all(line.endswith("% (64 members)") for line in lines), lines
    assert not any("100%" in line for line in lines), lines


# --- The environment ------------------------------------------------------------------------------


def without_python() -> list[M]:
    return [m for m in tiny_env() if not m.name.startswith("bin/python")]


def with_interpreter(data: bytes, name: str = "bin/python3.11") -> list[M]:
    """The tiny environment with bin/python pointing at `data` instead of this machine's ELF."""
    return [*without_python(), M(name, data=data, mode=0o755), M("bin/python", "symlink", target=name.split("/")[-1])]


def elf_for(machine: int, elf_class: int = 2, byte_order: int = 1) -> bytes:
    """This machine's interpreter with its ELF header saying another class, byte order or CPU."""
    elf = bytearray(HOST_PYTHON.read_bytes())
    elf[4], elf[5] = elf_class, byte_order
    elf[18:20] = machine.to_bytes(2, "little" if byte_order == 1 else "big")
    return bytes(elf)


def test_environment_without_python(tmp_path: Path) -> None:
    tarball = write_tar(tmp_path / "nopython.tar.gz", without_python())
    refused(start(tarball, tmp_path / "c"), 4, "has no bin/python")
    assert no_entries(tmp_path / "c")


def test_lock_timeout_is_one_line_that_leaves_the_lock_alone(tmp_path: Path) -> None:
    """Another start holds the entry's unpack lock past MLSERVER_ENV_LOCK_TIMEOUT: one line, and no
    advice to remove the lock file (that would let a second unpack run into the same entry)."""
    tarball = write_tar(tmp_path / "env.tar.gz", tiny_env())
    cache = tmp_path / "c"
    cache.mkdir()
    lock = cache / f"{entry_name(tarball)}.lock"
    with FileLock(str(lock)):  # the other start, unpacking
        proc = start(tarball, cache, MLSERVER_ENV_LOCK_TIMEOUT="0.5")
    refused(proc, 2, "still unpacking")
    assert "MLSERVER_ENV_LOCK_TIMEOUT" in error_line(proc) and "remove" not in error_line(proc)
    assert lock.exists() and no_entries(cache)


def test_environment_one_folder_down_says_so(tmp_path: Path) -> None:
    """`tar -czf env.tar.gz myenv` packs the folder, not the environment: adding python would not help."""
    tarball = write_tar(
        tmp_path / "nested.tar.gz", [M("myenv/", "dir"), *(replace(m, name=f"myenv/{m.name}") for m in tiny_env())]
    )
    proc = start(tarball, tmp_path / "c")
    refused(proc, 4, "one folder down, in myenv/")
    assert "tar -C myenv" in error_line(proc)
    assert no_entries(tmp_path / "c")
    inspected = run_entrypoint(["inspect", str(tarball), "--json"], entry_env(MLSERVER_ENV_CACHE_DIR=tmp_path / "c"))
    assert inspected.returncode == 4
    assert "one folder down, in myenv/" in json.loads(inspected.stdout)["problems"][0]


@pytest.mark.parametrize(
    "interpreter,words",
    [
        (lambda: elf_for(183), ("aarch64 64-bit Linux", "x86_64 64-bit Linux")),
        (lambda: elf_for(3, elf_class=1), ("x86 (32-bit) 32-bit Linux",)),
        (lambda: elf_for(22, byte_order=2), ("s390x",)),
        (lambda: b"\xcf\xfa\xed\xfe" + bytes(4000), ("macOS",)),
        (lambda: b"#!/bin/sh\necho (not python)\n", ("not an ELF executable",)),
    ],
    ids=["aarch64", "i386", "s390x", "macos", "shell-script"],
)
def test_environment_for_another_os_or_cpu(tmp_path: Path, interpreter, words: tuple[str, ...]) -> None:  # type: ignore[no-untyped-def]
    if os.uname().machine != "x86_64" and "x86_64 64-bit Linux" in words:
        words = words[:1]
    tarball = write_tar(tmp_path / "foreign.tar.gz", with_interpreter(interpreter()))
    refused(start(tarball, tmp_path / "c"), 4, *words)
    # Running a command in it says the same, before any exec: no shell "Syntax error: ( unexpected".
    proc = start(tarball, tmp_path / "c", "python", "-c", "print('ran')")
    refused(proc, 4, *words)
    assert "ran" not in proc.stdout and "Syntax error" not in proc.stderr
    assert no_entries(tmp_path / "c")


def test_interpreter_packed_without_its_execute_bit(tmp_path: Path) -> None:
    """The environment's python not executable: `python` resolved to the host's interpreter on PATH
    and ran in its place, silently."""
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    members = [M(m.name, m.kind, m.data, 0o644, m.target) if m.name == f"bin/{version}" else m for m in tiny_env()]
    tarball = write_tar(tmp_path / "env.tar.gz", members)
    proc = start(tarball, tmp_path / "c", "python", "-c", "import sys; print(sys.executable)")
    refused(proc, 4, "bin/python", "not executable")
    assert proc.stdout == "" and no_entries(tmp_path / "c")


def test_environment_built_for_windows(tmp_path: Path) -> None:
    tarball = write_tar(tmp_path / "win.zip.tar.gz", [M("python.exe", data=b"MZ" + bytes(200)), M("Lib/os.py")])
    refused(start(tarball, tmp_path / "c"), 4, "Windows")
    assert no_entries(tmp_path / "c")


# --- The cache directory --------------------------------------------------------------------------


def test_cache_dir_not_writable_by_this_user(shared_tmp: Path) -> None:
    tarball = write_tar(shared_tmp / "env.tar.gz", tiny_env())
    cache = shared_tmp / "cache"
    cache.mkdir(mode=0o755)  # root's; uid 65534 may read it but not write it
    proc = as_nobody(MLSERVER_ENV_TARBALL=str(tarball), MLSERVER_ENV_CACHE_DIR=str(cache))
    refused(proc, 2, "MLSERVER_ENV_CACHE_DIR", str(cache), "not writable by uid 65534")
    assert list(cache.iterdir()) == []
    # What root unpacked there, uid 65534 may use: a cache it cannot write serves what it has.
    assert start(tarball, cache).returncode == 0
    proc = as_nobody(
        "python", "-c", "print('served')", MLSERVER_ENV_TARBALL=str(tarball), MLSERVER_ENV_CACHE_DIR=str(cache)
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "served" and "cache hit" in proc.stderr, proc.stderr
    # An unprivileged user with a cache of its own is fine.
    own = shared_tmp / "own"
    own.mkdir()
    os.chown(own, NOBODY, NOBODY)
    proc = as_nobody(MLSERVER_ENV_TARBALL=str(tarball), MLSERVER_ENV_CACHE_DIR=str(own))
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.splitlines()[-1]).parent == own


def test_gc_on_a_cache_it_cannot_list_is_one_line(shared_tmp: Path) -> None:
    """Another user's cache (mode 0700): gc printed a PermissionError traceback."""
    cache = shared_tmp / "cache"
    cache.mkdir(mode=0o700)
    proc = as_nobody("gc", "--dry-run", MLSERVER_ENV_CACHE_DIR=str(cache))
    refused(proc, 2, f"cache directory {cache} cannot be listed by uid 65534", "MLSERVER_ENV_CACHE_DIR")


@pytest.mark.parametrize("case", ["damaged", "umask 077"])
def test_entry_of_another_uid_that_needs_unpacking_again_is_one_line(shared_tmp: Path, case: str) -> None:
    """A shared cache (a volume with fsGroup, OpenShift's group 0): another uid's start made the
    entry. This one cannot repair it (the entry was damaged) nor read it (made under umask 077),
    and its lock file is not this uid's to open for writing: one line, not filelock's traceback."""
    tarball = write_tar(shared_tmp / "env.tar.gz", tiny_env())
    cache = shared_tmp / "cache"
    cache.mkdir()
    cache.chmod(0o1777)
    umask = os.umask(0o077 if case == "umask 077" else 0o022)
    try:
        made = start(tarball, cache)
    finally:
        os.umask(umask)
    assert made.returncode == 0, made.stderr
    if case == "damaged":
        (Path(made.stdout.splitlines()[-1]) / "share" / "doc" / "README").unlink()
    proc = as_nobody(MLSERVER_ENV_TARBALL=str(tarball), MLSERVER_ENV_CACHE_DIR=str(cache))
    refused(proc, 2, "uid 65534", "MLSERVER_ENV_CACHE_DIR")


def test_cache_dir_cannot_be_created(tmp_path: Path) -> None:
    tarball = write_tar(tmp_path / "env.tar.gz", tiny_env())
    (tmp_path / "file").write_text("a file, not a directory")
    refused(start(tarball, tmp_path / "file" / "cache"), 2, "MLSERVER_ENV_CACHE_DIR", "cannot create cache directory")


@pytest.fixture
def read_only_cache(tmp_path: Path) -> Iterator[Path]:
    """A cache directory on a read-only bind mount of itself (root: a mode would not stop us)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    if subprocess.run(["mount", "--bind", str(cache), str(cache)], capture_output=True).returncode != 0:
        unavailable("mount --bind is not permitted here")
    try:
        yield cache
    finally:
        subprocess.run(["umount", str(cache)], check=True)


def test_read_only_cache_serves_what_it_has_and_refuses_to_grow(read_only_cache: Path, tmp_path: Path) -> None:
    cached = write_tar(tmp_path / "cached.tar.gz", tiny_env())
    assert start(cached, read_only_cache).returncode == 0  # unpacked while still writable
    subprocess.run(["mount", "-o", "remount,bind,ro", str(read_only_cache)], check=True)

    proc = start(cached, read_only_cache, "python", "-c", "print('from the read-only cache')")
    assert proc.returncode == 0 and proc.stdout.strip() == "from the read-only cache", proc.stderr
    assert "cache hit" in proc.stderr

    other = write_tar(tmp_path / "other.tar.gz", [*tiny_env(), M("lib/other", data=b"other")])
    refused(start(other, read_only_cache), 2, "MLSERVER_ENV_CACHE_DIR", str(read_only_cache), "not writable")


# --- conda-unpack's prefix limit --------------------------------------------------------------------


@pytest.fixture(scope="module")
def short_placeholder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real conda-pack tarball whose binary file was packed with a 32-character prefix."""
    return conda_pack_tiny(tmp_path_factory.mktemp("cp"), "/opt/tiny_placeholder_0123456789")


def test_prefix_too_long_names_both_lengths_and_the_setting(short_placeholder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "a-cache-directory-with-a-rather-long-name"
    proc = start(short_placeholder, cache)
    line = refused(proc, 2, "MLSERVER_ENV_CACHE_DIR", "32-character prefix")
    entry_len = len(str(cache)) + 9  # <cache>/<8 hex digits>
    assert f"({entry_len} characters)" in line and f"at least {entry_len - 32} characters shorter" in line
    assert no_entries(cache)


def test_prefix_short_enough_is_rewritten_in_binary_files(short_placeholder: Path) -> None:
    cache = Path(tempfile.mkdtemp(prefix="pl-", dir="/tmp"))  # "/tmp/pl-XXXXXXXX/<key8>": 25 characters
    try:
        proc = start(short_placeholder, cache)
        assert proc.returncode == 0, proc.stderr
        prefix = Path(proc.stdout.splitlines()[-1])
        lib = (prefix / "lib" / "libtiny.so").read_bytes()
        placeholder = b"/opt/tiny_placeholder_0123456789"
        assert placeholder not in lib
        assert str(prefix).encode() + b"/lib/libz.so" + b"\0" * (len(placeholder) - len(str(prefix))) in lib
        assert len(lib) == len(b"\x7fELF\0\0" + placeholder + b"/lib/libz.so\0\0\0trailer")
    finally:
        shutil.rmtree(cache, ignore_errors=True)


# --- The SHA-256 pin ------------------------------------------------------------------------------------


def test_sha256_pin_mismatch_is_refused_before_anything_is_extracted(tmp_path: Path) -> None:
    tarball = write_tar(tmp_path / "env.tar.gz", tiny_env())
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
    wrong = hashlib.sha256(b"another tarball").hexdigest()
    cache = tmp_path / "c"

    proc = start(tarball, cache, "python", "-c", "print('ran')", MLSERVER_ENV_TARBALL_SHA256=wrong)
    line = refused(proc, 2, digest, wrong, "MLSERVER_ENV_TARBALL_SHA256", "nothing was extracted")
    assert "extract:" not in proc.stderr and "ran" not in proc.stdout and no_entries(cache), line

    ok = start(tarball, cache, MLSERVER_ENV_TARBALL_SHA256=digest.upper())
    assert ok.returncode == 0, ok.stderr
    # Once cached (and its key remembered), a wrong pin is still refused, and nothing runs.
    proc = start(tarball, cache, "python", "-c", "print('ran')", MLSERVER_ENV_TARBALL_SHA256=wrong)
    refused(proc, 2, wrong, "MLSERVER_ENV_TARBALL_SHA256")
    assert "ran" not in proc.stdout

    line = refused(
        start(tarball, cache, MLSERVER_ENV_TARBALL_SHA256="abc123"), 2, "MLSERVER_ENV_TARBALL_SHA256", "64 hex"
    )
    assert "Value error" not in line  # pydantic's prefix for a validator's own words


def test_a_pin_is_checked_against_the_sha256_even_when_the_unpinned_key_is_remembered(tmp_path: Path) -> None:
    """An unpinned start remembers the tarball's BLAKE3, its key. A pin added later is checked
    against the SHA-256, computed then, never taken from that memo; the pinned entry is named by
    the pin, as a pinned URL's is, and both keys stay remembered."""
    tarball = write_tar(tmp_path / "env.tar.gz", tiny_env())
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
    wrong = hashlib.sha256(b"another tarball").hexdigest()
    cache = tmp_path / "c"

    unpinned = start(tarball, cache)
    assert unpinned.returncode == 0 and "key hashed" in unpinned.stderr, unpinned.stderr
    assert Path(unpinned.stdout.splitlines()[-1]).name == entry_name(tarball)
    proc = start(tarball, cache, "python", "-c", "print('ran')", MLSERVER_ENV_TARBALL_SHA256=wrong)
    refused(proc, 2, digest, wrong, "nothing was extracted")
    assert "ran" not in proc.stdout

    for logged in ("key hashed", "cache hit"):  # computed, then remembered beside the BLAKE3
        pinned = start(tarball, cache, MLSERVER_ENV_TARBALL_SHA256=digest)
        assert pinned.returncode == 0 and logged in pinned.stderr, pinned.stderr
        assert Path(pinned.stdout.splitlines()[-1]).name == digest[:8]
    again = start(tarball, cache)
    assert again.returncode == 0 and "cache hit" in again.stderr and "key hashed" not in again.stderr, again.stderr
    assert again.stdout == unpinned.stdout


def test_a_pin_is_checked_on_the_file_located_not_one_swapped_in_since(tmp_path: Path) -> None:
    """The tarball's path is a symlink (a ConfigMap's `..data`), switched to the pinned tarball
    while a start hashes and back before it extracts: the pin was checked on one file and another
    unpacked under it. The file hashed must be the one located, unchanged."""
    from entrypoint import keys, source
    from entrypoint.errors import ConfigError

    located, pinned = (write_tar(tmp_path / f"{n}.tar.gz", [*tiny_env(), M(n, data=n.encode())]) for n in "ab")
    link = tmp_path / "env.tar.gz"
    link.symlink_to(located)
    tarball = source.Tarball(link, link.stat().st_size, keys.file_identity(link.stat()))
    link.unlink()
    link.symlink_to(pinned)
    pin = hashlib.sha256(pinned.read_bytes()).hexdigest()
    with pytest.raises(ConfigError, match="replaced or changed while starting"):
        source.content_key(tarball, tmp_path / "c", pin)
    assert not (tmp_path / "c" / ".keys").exists()  # and nothing remembered


# --- Odd environments and settings (found by a review): one line, never a traceback ---------------


@pytest.mark.parametrize(
    "members,words",
    [
        ([*without_python(), M("bin/python", "dir")], ("bin/python cannot be read", "Is a directory")),
        ([*without_python(), M("lib/x", "dir"), M("bin/python", "symlink", target="../lib/x")], ("bin/python",)),
        ([*tiny_env(), M("bin/conda-unpack", data=b"\xff\xfe#!")], ("conda-unpack cannot be read", "not UTF-8")),
        ([*tiny_env(), M("bin/conda-unpack", "dir")], ("conda-unpack cannot be read", "Is a directory")),
        (
            [*tiny_env(), M("bin/conda-unpack", "symlink", target="x"), M("bin/x", "symlink", target="conda-unpack")],
            ("conda-unpack cannot be read", "symbolic links"),
        ),
    ],
    ids=[
        "python-is-a-directory",
        "python-links-to-a-directory",
        "unpack-script-not-text",
        "unpack-script-is-a-directory",
        "unpack-script-loops",
    ],
)
def test_unreadable_interpreter_or_unpack_script(members: list[M], words: tuple[str, ...], tmp_path: Path) -> None:
    tarball = write_tar(tmp_path / "odd.tar.gz", members)
    refused(start(tarball, tmp_path / "c"), 4, *words)
    assert no_entries(tmp_path / "c")


@pytest.mark.parametrize("record", ["('lib/a\\x00.txt', '/p', 'text')", "('lib/a.txt', '/x\\udc80', 'text')"])
def test_unpack_script_records_no_file_could_match(record: str, small_tarball: Path, tmp_path: Path) -> None:
    """A NUL in a path, a lone surrogate in a placeholder: refused as the script's fault, in a
    script the entrypoint would otherwise apply in-process."""
    script = unpack_script_with(small_tarball, [record])
    tarball = write_tar(tmp_path / "odd.tar.gz", [*tiny_env(), M("bin/conda-unpack", data=script, mode=0o755)])
    refused(start(tarball, tmp_path / "c"), 4, "cannot read its prefix records")
    assert no_entries(tmp_path / "c")


@pytest.mark.parametrize("cache,words", [("c:d", ("must not contain ':'",)), ("c-\udcff", ("valid UTF-8",))])
def test_cache_dir_that_cannot_be_a_prefix(cache: str, words: tuple[str, ...], tmp_path: Path) -> None:
    """A ":" would split PATH where the environment's bin/ goes; conda-unpack writes the prefix as UTF-8."""
    tarball = write_tar(tmp_path / "env.tar.gz", tiny_env())
    refused(start(tarball, tmp_path / cache), 2, "MLSERVER_ENV_CACHE_DIR", *words)
    assert not (tmp_path / cache).exists()


def test_activation_scripts_run_and_keep_bytes_that_are_not_utf8(tmp_path: Path) -> None:
    """conda's activate.d scripts are sourced; a variable that is not UTF-8 (in the container's
    environment or exported by a script) passes through to the command byte for byte."""
    script = b"export FROM_SCRIPT=1\nexport RAW=$(printf 'caf\\351')\n"
    members = [*tiny_env(), M("etc/conda/activate.d/x.sh", data=script)]
    tarball = write_tar(tmp_path / "act.tar.gz", members)
    env = {**entry_env(MLSERVER_ENV_TARBALL=tarball, MLSERVER_ENV_CACHE_DIR=tmp_path / "c"), "LATIN1": b"caf\xe9"}
    for _ in range(2):  # cold, then warm: both activate
        proc = subprocess.run([*ENTRYPOINT, "env"], env=env, capture_output=True, timeout=120, cwd=REPO)  # type: ignore[arg-type]
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.split(b"\n")
        assert b"FROM_SCRIPT=1" in lines and b"RAW=caf\xe9" in lines and b"LATIN1=caf\xe9" in lines


def test_a_bad_setting_is_refused_on_a_cache_hit_too(tmp_path: Path) -> None:
    """Settings a hit does not need are still checked, so a typo fails on every node alike, not
    only on the first start of a fresh one; plain good values keep the pydantic-free warm path."""
    tarball = write_tar(tmp_path / "env.tar.gz", tiny_env())
    assert start(tarball, tmp_path / "c").returncode == 0
    for name, value in (
        ("LOCK_TIMEOUT", "abc"),
        ("MAX_MEMBERS", "-1"),
        ("REMOTE_RETRIES", "-3"),
        ("REMOTE_TIMEOUT", "0"),
    ):
        refused(start(tarball, tmp_path / "c", "true", **{f"MLSERVER_ENV_{name}": value}), 2, f"MLSERVER_ENV_{name}")
    good = {"MLSERVER_ENV_LOCK_TIMEOUT": "30", "MLSERVER_ENV_MAX_MEMBERS": "10", "MLSERVER_ENV_REMOTE_RETRIES": "0"}
    proc = start(tarball, tmp_path / "c", "true", **good)
    assert proc.returncode == 0 and "locate:" in proc.stderr and "cache hit" in proc.stderr, proc.stderr


def test_warm_unpack_refuses_what_a_cold_one_and_the_server_refuse(tmp_path: Path) -> None:
    """An init container's `unpack` on a warm cache took MLSERVER_ENV_INIT=bogus and STOP_GRACE=abc
    (exit 0) that a cold `unpack` and every server start refuse: the init step passed, then the
    pod's server failed on the same variables."""
    tarball = write_tar(tmp_path / "env.tar.gz", tiny_env())
    assert start(tarball, tmp_path / "c").returncode == 0
    for name, value in (("INIT", "bogus"), ("STOP_GRACE", "abc")):
        refused(start(tarball, tmp_path / "c", **{f"MLSERVER_ENV_{name}": value}), 2, f"MLSERVER_ENV_{name}")
    proc = start(tarball, tmp_path / "c", MLSERVER_ENV_INIT="never", MLSERVER_ENV_STOP_GRACE="3")
    assert proc.returncode == 0 and ", cache hit " in proc.stderr, proc.stderr  # still the pydantic-free path


def test_an_infinite_timeout_or_age_is_refused(tmp_path: Path) -> None:
    """MLSERVER_ENV_REMOTE_TIMEOUT=inf was taken, and aiohttp's unarmable timer came back from
    fsspec as "not found (no such object); check the URL" for a URL that was there;
    MLSERVER_ENV_CACHE_MAX_AGE=inf was taken where `gc --max-age inf` is refused."""
    tarball = write_tar(tmp_path / "env.tar.gz", tiny_env())
    for name in ("REMOTE_TIMEOUT", "CACHE_MAX_AGE"):
        for value in ("inf", "1e400"):
            proc = start(tarball, tmp_path / "c", "true", **{f"MLSERVER_ENV_{name}": value})
            refused(proc, 2, f"MLSERVER_ENV_{name}: Input should be a finite number")


def test_relocate_set_keeps_the_pydantic_free_warm_path(tmp_path: Path) -> None:
    """MLSERVER_ENV_RELOCATE only says how a miss relocates: set, even to its default, a hit took
    the settings model's ~0.3 s (the full path logs `cache hit: PREFIX`, the fast one `locate: N ms,
    cache hit`). A value the model refuses is still refused on a hit."""
    tarball = write_tar(tmp_path / "env.tar.gz", tiny_env())
    assert start(tarball, tmp_path / "c").returncode == 0
    for value in ("auto", "conda-unpack"):
        proc = start(tarball, tmp_path / "c", "true", MLSERVER_ENV_RELOCATE=value)
        assert proc.returncode == 0 and "locate:" in proc.stderr and ", cache hit " in proc.stderr, proc.stderr
    refused(start(tarball, tmp_path / "c", "true", MLSERVER_ENV_RELOCATE="sometimes"), 2, "MLSERVER_ENV_RELOCATE")


def test_a_misspelt_setting_is_named_with_the_likely_one(tmp_path: Path) -> None:
    tarball = write_tar(tmp_path / "env.tar.gz", tiny_env())
    proc = run_entrypoint(["true"], entry_env(MLSERVER_ENV_TARBAL=str(tarball), MLSERVER_ENV_CACHE_DIR=tmp_path / "c"))
    assert proc.returncode == 0, proc.stderr
    assert "MLSERVER_ENV_TARBAL is not a setting" in proc.stderr and "did you mean MLSERVER_ENV_TARBALL?" in proc.stderr


def test_a_command_found_nowhere_exits_127(tmp_path: Path) -> None:
    tarball = write_tar(tmp_path / "env.tar.gz", tiny_env())
    line = refused(start(tarball, tmp_path / "c", "no-such-command"), 127, "command not found", "no-such-command")
    assert str(tmp_path / "c") in line  # where it was looked for
    refused(start("", tmp_path / "c", "no-such-command"), 127, "not on PATH")
    # mlserver itself with no environment: the likely fix is the tarball, not the spelling
    proc = start("", tmp_path / "c", "mlserver", "start", str(tmp_path), PATH="/usr/bin:/bin")
    refused(proc, 127, "mlserver is not on PATH and no environment is configured", "set MLSERVER_ENV_TARBALL")


def test_a_command_path_that_cannot_be_run_exits_126(tmp_path: Path) -> None:
    """As a shell: a file without execute bits, or a directory, is not "not found"."""
    text = tmp_path / "notes.txt"
    text.write_text("x")
    refused(start("", tmp_path / "c", str(text)), 126, f"cannot run {text}: it is not executable", "chmod +x")
    refused(start("", tmp_path / "c", str(tmp_path)), 126, "is a directory")


@pytest.mark.parametrize("init", ["never", "always"])
def test_a_program_the_kernel_will_not_start_is_one_line_126(tmp_path: Path, init: str) -> None:
    """A pip script whose #! names its build machine's interpreter, and an executable without a
    #! line: one line naming the cause, exit 126 as a shell's, by exec and under the init alike."""
    script = tmp_path / "pip"
    script.write_text("#!/opt/builder/envs/old-sklearn/bin/python3.8\nprint(1)\n")
    garbage = tmp_path / "blob"
    garbage.write_bytes(b"\x00\x01 not a program\n")
    for path in (script, garbage):
        path.chmod(0o755)
    refused(
        start("", tmp_path / "c", str(script), MLSERVER_ENV_INIT=init), 126,
        f"cannot run {script}: its #! line names /opt/builder/envs/old-sklearn/bin/python3.8", "first line",
    )  # fmt: skip
    refused(start("", tmp_path / "c", str(garbage), MLSERVER_ENV_INIT=init), 126, "not a program", "#! line")
    script.write_text("#!/opt/nowhere/bin/bash -e\necho 1\n")  # not Python: no `python script` advice
    line = refused(start("", tmp_path / "c", str(script), MLSERVER_ENV_INIT=init), 126, "install bash here")
    assert "`python" not in line


def test_a_models_dir_the_command_does_not_serve_is_warned_about(tmp_path: Path) -> None:
    """The image's CMD serves /mnt/models; MLSERVER_MODELS_DIR set alone moved only where the
    tarball is looked for (MLServer's own images serve it): the user is told, and how to fix it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "mlserver").write_text('#!/bin/sh\necho "serving $2"\n')
    (bin_dir / "mlserver").chmod(0o755)
    models = tmp_path / "models"
    models.mkdir()
    env = entry_env(MLSERVER_ENV_TARBALL="", MLSERVER_MODELS_DIR=models, PATH=f"{bin_dir}:{os.environ['PATH']}")
    proc = run_entrypoint(["mlserver", "start", "/mnt/models"], env)
    assert proc.returncode == 0 and proc.stdout == "serving /mnt/models\n", proc.stderr
    assert f"serving /mnt/models, the command's folder, not MLSERVER_MODELS_DIR={models}" in proc.stderr
    assert f"`mlserver start {models}`" in proc.stderr
    for command in (["mlserver", "start", f"{models}/"], []):  # its folder, or the default command: no warning
        proc = run_entrypoint(command, env)
        assert proc.returncode == 0 and "warning" not in proc.stderr, proc.stderr
    # the same folder named relatively (from the repository, where it runs): no warning either
    proc = run_entrypoint(["mlserver", "start", os.path.relpath(models, REPO)], env)
    assert proc.returncode == 0 and "warning" not in proc.stderr, proc.stderr


def test_what_the_server_will_miss_is_warned_about(tmp_path: Path) -> None:
    """mlserver 1.1 reports ready without a models folder, and a custom runtime found only
    through PYTHONPATH (which the environment does not get) failed with pydantic's words."""
    mlserver = M("bin/mlserver", data=b'#!/bin/sh\necho "path=$PYTHONPATH"\n', mode=0o755)
    tarball = write_tar(tmp_path / "env.tar.gz", [*tiny_env(), mlserver])
    proc = start(tarball, tmp_path / "c", "mlserver", "start", str(tmp_path / "nowhere"), PYTHONPATH=str(tmp_path))
    assert proc.returncode == 0 and proc.stdout == "path=\n", proc.stderr
    assert f"warning: the models folder {tmp_path / 'nowhere'} does not exist" in proc.stderr
    assert "warning: PYTHONPATH is not passed to the environment" in proc.stderr
    proc = start(tarball, tmp_path / "c", "mlserver", "start", str(tmp_path))
    assert proc.returncode == 0 and "warning" not in proc.stderr, proc.stderr


def test_the_folder_a_command_serves_is_the_models_dir_when_the_variable_is_unset(tmp_path: Path) -> None:
    """`mlserver-entrypoint mlserver start /models` with /models/environment.tar.gz: the start said
    "no environment tarball configured" and ran the command without it (in the image, its own
    mlserver would have served the model with other libraries)."""
    mlserver = M("bin/mlserver", data=b'#!/bin/sh\necho "served $2 in $CONDA_PREFIX"\n', mode=0o755)
    models = tmp_path / "models"
    models.mkdir()
    write_tar(models / "environment.tar.gz", [*tiny_env(), mlserver])
    env = entry_env(MLSERVER_ENV_CACHE_DIR=tmp_path / "c")
    proc = run_entrypoint(["mlserver", "start", str(models)], env)
    assert proc.returncode == 0 and proc.stdout.startswith(f"served {models} in {tmp_path / 'c'}/"), proc.stderr
    assert "warning" not in proc.stderr


def test_an_entry_seen_at_another_path_is_not_served(tmp_path: Path) -> None:
    """Its files name the path it was unpacked at (shebangs, text files): through a symlink to the
    same directory it is the same entry; the volume mounted elsewhere is one clear line, and the
    entry is left alone for whoever uses it at its own path."""
    tarball = write_tar(tmp_path / "env.tar.gz", tiny_env())
    assert start(tarball, tmp_path / "a").returncode == 0
    (tmp_path / "link").symlink_to(tmp_path / "a")
    proc = start(tarball, tmp_path / "link", "true")
    assert proc.returncode == 0 and "cache hit" in proc.stderr, proc.stderr
    (tmp_path / "a").rename(tmp_path / "b")  # the same volume, mounted at another path
    for args in (["true"], ["unpack"]):
        line = refused(start(tarball, tmp_path / "b", *args), 2, f"was unpacked at {tmp_path / 'a'}", str(tmp_path))
        assert "mount the cache volume at" in line
    assert [p.name for p in (tmp_path / "b").glob("*.ready")]  # not discarded


def test_help_of_each_subcommand_is_its_usage_not_an_error(tmp_path: Path) -> None:
    """`gc --help` printed 'error: usage: …' and exited 2, even with the settings fine."""
    env = entry_env(MLSERVER_ENV_CACHE_DIR=tmp_path / "cache", MLSERVER_ENV_VERIFY="bogus")
    for sub in ("unpack", "inspect", "gc"):
        for flag in ("--help", "-h"):
            proc = run_entrypoint([sub, flag], env, timeout=60)
            assert proc.returncode == 0, proc.stderr
            assert f"mlserver-entrypoint {sub}" in proc.stdout and "error" not in proc.stderr
    assert not (tmp_path / "cache").exists()


def test_an_empty_cache_dir_or_models_dir_is_the_default_not_the_working_directory(tmp_path: Path) -> None:
    """`MLSERVER_ENV_CACHE_DIR=` put the cache in the working directory (Path("")), where the warm
    path, reading empty as unset, never looked; `MLSERVER_MODELS_DIR=` likewise served '.'."""
    tarball = write_tar(tmp_path / "env.tar.gz", tiny_env())
    env = entry_env(MLSERVER_ENV_CACHE_DIR="", MLSERVER_MODELS_DIR="")
    proc = run_entrypoint(["inspect", str(tarball)], env, timeout=60)
    assert f"cache entry:   /tmp/mlenv-{os.getuid()}/" in proc.stdout, proc.stdout + proc.stderr
    proc = run_entrypoint(["unpack"], entry_env(MLSERVER_MODELS_DIR=""), timeout=60)
    assert "environment.tar.gz in MLSERVER_MODELS_DIR (/mnt/models)" in error_line(proc)


# A bug in the extractor, not a fault of the archive: it must not be reported as "corrupt archive".
BUG_IN_THE_EXTRACTOR = """
from entrypoint import cli, extract
def broken(self, *args):
    raise ValueError("a bug")
extract.Extractor._write_file = broken
cli.main(["unpack"])
"""


def test_a_bug_is_a_traceback_not_a_corrupt_archive(tmp_path: Path) -> None:
    """Errors of the decoders become archive errors inside the decoders only: a ValueError raised
    elsewhere ends the start with its traceback and exit 1, and nothing is cached."""
    tarball = write_tar(tmp_path / "env.tar.gz", tiny_env())
    env = entry_env(MLSERVER_ENV_TARBALL=tarball, MLSERVER_ENV_CACHE_DIR=tmp_path / "c")
    proc = subprocess.run(
        [sys.executable, "-c", BUG_IN_THE_EXTRACTOR], env=env, cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" in proc.stderr and "ValueError: a bug" in proc.stderr, proc.stderr
    assert "corrupt" not in proc.stderr and "error:" not in proc.stderr, proc.stderr
    assert no_entries(tmp_path / "c")


def test_debug_prints_the_traceback_after_the_one_line(tmp_path: Path) -> None:
    """MLSERVER_ENV_DEBUG=1: the error line, then the chained traceback behind it (here from the
    worker that unpacked); without it, the line alone."""
    tarball = write_tar(tmp_path / "env.tar.gz", [*tiny_env(), M("../evil", data=b"x")])
    quiet = start(tarball, tmp_path / "c")
    line = refused(quiet, 3, "'..' in path")
    assert "Traceback" not in quiet.stderr
    loud = start(tarball, tmp_path / "c", MLSERVER_ENV_DEBUG="1")
    assert loud.returncode == 3 and [x for x in loud.stderr.splitlines() if "error:" in x] == [line], loud.stderr
    after = loud.stderr.split(line, 1)[1]
    assert "Traceback (most recent call last)" in after and "member ../evil: '..' in path" in after, loud.stderr
    assert 'extract.py", line' in after, loud.stderr  # chained: where the rule refused it
    for spelling in ("yes", "On", "TRUE"):  # any spelling the settings accept
        assert "Traceback" in start(tarball, tmp_path / "c", MLSERVER_ENV_DEBUG=spelling).stderr, spelling
    assert "Traceback" not in start(tarball, tmp_path / "c", MLSERVER_ENV_DEBUG="off").stderr


def test_an_error_longer_than_a_pipe_holds_is_one_line_not_a_hang(tmp_path: Path) -> None:
    """The unpacking worker hands its error line to the start to print; a line of 90,000
    characters (a member's name) must neither block the worker nor be lost."""
    tarball = write_tar(tmp_path / "long.tar.gz", [*tiny_env(), M("../" + "a" * 90_000, data=b"x")])
    line = refused(start(tarball, tmp_path / "c"), 3, "'..' in path")
    assert len(line) > 90_000
    long_models = tmp_path / ("m" * 200) / ("m" * 200)
    huge = str(long_models) + "/" + "/".join(["m" * 200] * 350)  # 70,000 characters, in the settings handed over
    proc = start(write_tar(tmp_path / "env.tar.gz", tiny_env()), tmp_path / "c", MLSERVER_MODELS_DIR=huge)
    assert proc.returncode == 0, proc.stderr


def test_closed_or_broken_standard_streams_neither_stop_the_command_nor_reach_the_cache(tmp_path: Path) -> None:
    """Started with stdin, stdout or stderr closed, the command still runs, and a cache file the
    entrypoint opened does not become its stdin or stdout; with stderr a pipe nobody reads, the
    entry is still unpacked and the command run."""
    tarball = write_tar(tmp_path / "env.tar.gz", tiny_env())
    cache = tmp_path / "c"
    env = entry_env(MLSERVER_ENV_TARBALL=tarball, MLSERVER_ENV_CACHE_DIR=cache, MLSERVER_ENV_INIT="always")
    marker = tmp_path / "ran"
    for redirect in ("<&-", ">&-", "2>&-", "<&- >&- 2>&-"):
        for init in ("always", "never"):
            marker.unlink(missing_ok=True)
            script = f'"$@" {redirect}; echo $? > {marker}'
            command = ["sh", "-c", f"cat 2>/dev/null; echo hi; touch {marker}.cmd"]
            subprocess.run(["sh", "-c", script, "sh", *ENTRYPOINT, *command], env={**env, "MLSERVER_ENV_INIT": init},
                           cwd=REPO, timeout=120, check=False)  # fmt: skip
            assert marker.read_text().strip() == "0", (redirect, init)
            assert (tmp_path / "ran.cmd").exists(), (redirect, init)
            (tmp_path / "ran.cmd").unlink()
    assert all(p.stat().st_size == 0 for p in cache.glob("*.use")), "a command wrote into a lease file"
    shutil.rmtree(cache)
    subprocess.run(
        ["sh", "-c", '"$@" 2>&1 >/dev/null | head -c1 >/dev/null', "sh", *ENTRYPOINT, "sh", "-c", f"touch {marker}"],
        env=env, cwd=REPO, timeout=120, check=False,
    )  # fmt: skip
    assert marker.exists() and list(cache.glob("*.ready")), "a lost log line stopped the start"


def test_activation_scripts_that_use_the_terminal_do_not_hang(tmp_path: Path) -> None:
    """activate.d scripts run in a session of their own, with no controlling terminal: on a
    terminal, `stty` does not stop the script for good (SIGTTOU, as a background job's)."""
    import pty
    import select
    import time

    scripts = [
        M("etc/conda/activate.d/a.sh", data=b"stty sane 2>/dev/null || true\n"),
        M("etc/conda/activate.d/b.sh", data=b"stty -echo 2>/dev/null || true\nexport ACTIVATED=1\n"),
    ]
    tarball = write_tar(tmp_path / "env.tar.gz", [*tiny_env(), *scripts])
    env = entry_env(MLSERVER_ENV_TARBALL=tarball, MLSERVER_ENV_CACHE_DIR=tmp_path / "c")
    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(REPO)
        os.execve(sys.executable, [sys.executable, "-m", "entrypoint", "sh", "-c", "echo ACTIVATED=$ACTIVATED"], env)
    out = b""
    with contextlib.suppress(OSError):  # EIO once the child is gone
        while select.select([fd], [], [], 60)[0] and (chunk := os.read(fd, 65536)):
            out += chunk
    deadline = time.monotonic() + 30  # the terminal closes a moment before the process is gone
    while not (done := os.waitpid(pid, os.WNOHANG))[0] and time.monotonic() < deadline:
        time.sleep(0.05)
    if not done[0]:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    os.close(fd)
    assert done[0] and os.waitstatus_to_exitcode(done[1]) == 0, out.decode(errors="replace")
    assert b"ACTIVATED=1" in out, out.decode(errors="replace")
