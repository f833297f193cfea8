"""Relocation in-process gives the very tree the packed conda-unpack gives (issue 5).

Each conda-pack release whose script `relocate.KNOWN_SCRIPTS` lists packs the same prefix here
(text and binary records, several placeholders in one string, one with no NUL after it, files
the placeholder is absent from); the archive is then relocated once by its own conda-unpack and
once by `relocate.rewrite_prefixes`, at the same path, and the two trees must be identical.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import pytest
from archives import CONDA_PACK, M, conda_pack_tiny, content_tree, tiny_env, unpack_script_with, write_tar
from support import ENTRYPOINT, REPO, entry_env, error_line, run_entrypoint

from entrypoint import archive, extract, relocate

RELEASES = ["0.7.0", "0.7.1", "0.8.0", "0.8.1", "0.9.1", "0.9.2"]
INSTALLED = "0.9.2"  # pyproject.toml's pin; the others are fetched from PyPI once per machine
PLACEHOLDER = "/opt/tiny_placeholder_" + "x" * 80  # long: binary files take any shorter prefix
LIMITS = extract.Limits(max_members=10_000, max_unpacked_bytes=1 << 30)
FIXTURES = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mlserver-env-fixtures"


def release_cli(release: str) -> tuple[list[str], dict[str, str] | None]:
    """How to run conda-pack `release`: the installed one, or its wheel unpacked into the fixture cache."""
    if release == INSTALLED:
        return list(CONDA_PACK), None
    where = FIXTURES / f"conda-pack-{release}"
    if not where.is_dir():
        FIXTURES.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=FIXTURES) as tmp:  # beside it: the rename stays on one filesystem
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                 f"conda-pack=={release}", "-d", tmp],
                check=True, capture_output=True,
            )  # fmt: skip
            (wheel,) = Path(tmp).glob("*.whl")
            unpacked = Path(tmp) / "unpacked"
            with zipfile.ZipFile(wheel) as zf:
                zf.extractall(unpacked)
            try:
                os.rename(unpacked, where)  # whole or not at all
            except OSError:
                if not where.is_dir():  # else a parallel run won, which is as good
                    raise
    return list(CONDA_PACK), {**os.environ, "PYTHONPATH": str(where)}


def pack(out: Path, release: str) -> Path:
    prefix = out / "prefix"
    ph = PLACEHOLDER.encode()
    managed = {
        # several placeholders in one NUL-terminated string, and one with no NUL after it
        "lib/libtiny.so": (
            b"\x7fELF\0\0" + ph + b"/lib/libz.so\0\0\0rpath=" + ph + b"/lib:" + ph + b"/lib64\0tail " + ph,
            "binary",
        ),
        "lib/libnone.so": (b"\x7fELF\0\0no placeholder here\0", "binary"),
        "etc/tiny.conf": (b"prefix=" + ph + b"\nlibs=" + ph + b"/lib:" + ph + b"/lib64\n", "text"),
        "share/tiny/plain.txt": (b"nothing to rewrite\n", "text"),
    }
    unmanaged = {  # conda-pack records unmanaged text files with the prefix's own path as placeholder
        "lib/pkgconfig/tiny.pc": f"prefix={prefix}\nlibdir=${{prefix}}/lib\n".encode(),
        "bin/tiny-tool": f"#!{prefix}/bin/python\nprint('{prefix}')\n".encode(),
    }
    cli, env = release_cli(release)
    return conda_pack_tiny(out, PLACEHOLDER, managed, unmanaged, cli, env)


def unpacked(tarball: Path, dest: Path) -> relocate.UnpackScript:
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir()
    with open(tarball, "rb") as raw:
        extract.extract(archive.members(raw), dest, LIMITS)
    script = relocate.read_unpack_script(dest)
    assert script is not None
    return script


@pytest.mark.parametrize("release", RELEASES)
def test_in_process_relocation_gives_conda_unpacks_tree(release: str, tmp_path: Path) -> None:
    tarball = pack(tmp_path / "pack", release)
    dest = tmp_path / "env"  # the same path both times: the prefix is part of the rewritten bytes

    script = unpacked(tarball, dest)
    code = relocate.script_digest((dest / relocate.UNPACK_SCRIPT).read_text())
    assert script.known == f"conda-pack {release}", f"conda-pack {release} wrote a script of digest {code}"
    packed = content_tree(dest)
    subprocess.run([sys.executable, str(dest / relocate.UNPACK_SCRIPT)], cwd=dest, check=True, capture_output=True)
    theirs = content_tree(dest)

    script = unpacked(tarball, dest)
    inode = os.stat(dest / "lib/libtiny.so").st_ino
    changed = relocate.rewrite_prefixes(dest, script.records)
    ours = content_tree(dest)

    assert ours == theirs
    changed_files = {"lib/libtiny.so", "etc/tiny.conf", "lib/pkgconfig/tiny.pc", "bin/tiny-tool"}
    assert {rel for rel in theirs if theirs[rel] != packed[rel]} == changed_files
    assert changed == len(changed_files)
    assert os.stat(dest / "lib/libtiny.so").st_ino == inode  # written in place: hard links stay linked
    data = (dest / "lib/libtiny.so").read_bytes()
    assert data.endswith(b"tail " + PLACEHOLDER.encode())  # no NUL after it: left alone, as conda-unpack does
    assert f"rpath={dest}/lib:{dest}/lib64\0".encode() in data


def test_unpack_relocates_in_process_unless_told_or_unknown(tmp_path: Path) -> None:
    """The command line's choice: in-process for a known script, the packed script when
    MLSERVER_ENV_RELOCATE=conda-unpack or when the script is not one we know (here: edited)."""
    tarball = pack(tmp_path / "pack", INSTALLED)
    env = entry_env(MLSERVER_ENV_TARBALL=tarball, MLSERVER_ENV_CACHE_DIR=tmp_path / "c1")
    proc = run_entrypoint(["unpack"], env)
    assert proc.returncode == 0, proc.stderr
    assert f"4 changed, in-process by conda-pack {INSTALLED}'s rules" in proc.stderr
    ours = content_tree(Path(proc.stdout.strip()))

    env.update(MLSERVER_ENV_RELOCATE="conda-unpack", MLSERVER_ENV_CACHE_DIR=str(tmp_path / "c2"))
    proc = run_entrypoint(["unpack"], env)
    assert proc.returncode == 0, proc.stderr
    assert f"by {relocate.UNPACK_SCRIPT}" in proc.stderr
    theirs = content_tree(Path(proc.stdout.strip()))
    # The same tree but for the prefix written into the files (c1 against c2, same length).
    assert ours.keys() == theirs.keys()

    edited = "#!/usr/bin/env python\nopen('edited', 'w').close()\n_prefix_records = [\n]\n"
    tarball = write_tar(
        tmp_path / "edited.tar.gz", [*tiny_env(), M("bin/conda-unpack", data=edited.encode(), mode=0o755)]
    )
    env.update(MLSERVER_ENV_TARBALL=str(tarball), MLSERVER_ENV_RELOCATE="auto")
    proc = run_entrypoint(["unpack"], env)
    assert proc.returncode == 0, proc.stderr
    assert (Path(proc.stdout.strip()) / "edited").exists()  # the script itself ran


_PACKED: list[Path] = []


def known_script(records: list[str]) -> bytes:
    """A bin/conda-unpack conda-pack 0.9.2 could have written, with these record lines."""
    if not _PACKED:
        _PACKED.append(pack(Path(tempfile.mkdtemp(prefix="known-script-")), INSTALLED))
    return unpack_script_with(_PACKED[0], records)


@pytest.mark.parametrize(
    ("record", "complaint"),
    [
        ("('../../../outside.txt', '/opt/x', 'text')", "lists ../../../outside.txt, outside the environment"),
        ("('/etc/hostname', '/opt/x', 'text')", "lists /etc/hostname, outside the environment"),
        ("('share/doc/README', '/opt/x', 'octal')", "gives share/doc/README the unknown mode 'octal'"),
        ("('share/doc/missing', '/opt/x', 'text')", "share/doc/missing, which cannot be rewritten (No such file"),
        ("('share/doc', '/opt/x', 'text')", "share/doc, which cannot be rewritten (Is a directory)"),
    ],
)
def test_bad_records_are_refused_before_anything_is_published(record: str, complaint: str, tmp_path: Path) -> None:
    (tmp_path / "outside.txt").write_text("/opt/x\n")
    script = known_script(["('share/doc/README', '/opt/x', 'text')", record])
    tarball = write_tar(tmp_path / "env.tar.gz", [*tiny_env(), M("bin/conda-unpack", data=script, mode=0o755)])
    cache = tmp_path / "cache" / "sub"  # outside.txt is ../../../outside.txt from the entry
    env = entry_env(MLSERVER_ENV_TARBALL=tarball, MLSERVER_ENV_CACHE_DIR=cache)
    proc = run_entrypoint(["unpack"], env)
    assert proc.returncode != 0
    assert complaint in error_line(proc)
    assert (tmp_path / "outside.txt").read_text() == "/opt/x\n"
    assert not list(cache.glob("*.ready"))
    assert not [p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")]


def test_a_big_recorded_file_leaves_the_job_to_the_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Files are read whole, as conda-unpack does; over MAX_REWRITE_BYTES we run the script instead,
    which keeps the entrypoint's own memory flat."""
    tarball = pack(tmp_path / "pack", INSTALLED)
    dest = tmp_path / "env"
    script = unpacked(tarball, dest)
    before = content_tree(dest)
    monkeypatch.setattr(relocate, "MAX_REWRITE_BYTES", 40)  # etc/tiny.conf is bigger
    assert relocate.rewrite_prefixes(dest, script.records) is None
    assert content_tree(dest) == before  # nothing rewritten: the script gets the whole job


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_during_in_process_relocation_leaves_nothing(sig: signal.Signals, tmp_path: Path) -> None:
    """60,000 records of one 64 KiB file, listed again and again, keep the relocation busy for
    seconds (with a 5-byte file it took 0.3 s, which a loaded CI machine's signal could miss)."""
    script = known_script(["('share/doc/README', '/opt/x', 'text')"] * 60_000)
    members = [M(m.name, data=b"x" * 65536) if m.name == "share/doc/README" else m for m in tiny_env()]
    tarball = write_tar(tmp_path / "env.tar.gz", [*members, M("bin/conda-unpack", data=script, mode=0o755)])
    cache = tmp_path / "cache"
    proc = subprocess.Popen(
        [*ENTRYPOINT, "unpack"], env=entry_env(MLSERVER_ENV_TARBALL=tarball, MLSERVER_ENV_CACHE_DIR=cache),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("mlserver-entrypoint: extract:"):
            break
    proc.send_signal(sig)
    _, rest = proc.communicate(timeout=60)
    done = subprocess.CompletedProcess(proc.args, proc.returncode, "", "".join(lines) + rest)
    assert done.returncode != 0, done.stderr
    assert f"stopped by {sig.name}" in error_line(done)
    assert "relocate:" not in done.stderr  # it landed in the relocation
    assert not list(cache.glob("*.ready")) and not [p for p in cache.iterdir() if p.is_dir() and p.name[0] != "."]


def test_an_interpreter_that_cannot_be_launched_for_the_script_is_one_line(tmp_path: Path) -> None:
    """The packed script is run with the environment's interpreter; one this kernel cannot exec
    (here: its ELF names a program loader this machine lacks, as a musl build on glibc does)
    failed the launch itself, with a traceback."""
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    python = tmp_path / version
    shutil.copyfile(sys.executable, python)
    subprocess.run(["patchelf", "--set-interpreter", "/lib/ld-musl-x86_64.so.404", str(python)], check=True)
    members = [
        M(m.name, m.kind, python.read_bytes(), m.mode, m.target) if m.name == f"bin/{version}" else m
        for m in tiny_env()
    ]
    script = b"#!/usr/bin/env python\n_prefix_records = [\n]\n"  # not a known release's: it must be run
    tarball = write_tar(tmp_path / "env.tar.gz", [*members, M("bin/conda-unpack", data=script, mode=0o755)])
    cache = tmp_path / "c"
    proc = run_entrypoint(["unpack"], entry_env(MLSERVER_ENV_TARBALL=tarball, MLSERVER_ENV_CACHE_DIR=cache))
    assert proc.returncode == 4, proc.stderr
    line = error_line(proc)
    assert "bin/python" in line and "No such file or directory" in line, line
    assert not list(cache.glob("*.ready"))
    assert not [p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")]


def _processes_running(pattern: str) -> list[str]:
    return subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()


# The stop comes after the fork of conda-unpack, before it is exec'd or handed back: the start
# ends the worker's whole process group, which that fork belongs to.
STOPPED_IN_THE_FORK = """
import os, signal, subprocess, sys, time
launch = subprocess.Popen._execute_child
def stopped_in_the_fork(self, *args):
    launch(self, *args)
    os.kill(os.getppid(), signal.SIGTERM)  # the start, parent of the worker running Popen
    time.sleep(60)
subprocess.Popen._execute_child = stopped_in_the_fork
from entrypoint import cli
cli.main(["unpack"])
"""


def test_a_stop_while_conda_unpack_is_launched_kills_it(tmp_path: Path) -> None:
    """Whatever the launch had got to, conda-unpack does not outlive the stopped start."""
    script = b"import time\ntime.sleep(60)\n"  # not a known release's: it is run
    tarball = write_tar(tmp_path / "env.tar.gz", [*tiny_env(), M("bin/conda-unpack", data=script, mode=0o755)])
    env = entry_env(MLSERVER_ENV_TARBALL=tarball, MLSERVER_ENV_CACHE_DIR=tmp_path / "c")
    proc = subprocess.run(
        [sys.executable, "-c", STOPPED_IN_THE_FORK], env=env, cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 143 and "stopped by SIGTERM" in error_line(proc), proc.stderr
    assert not _processes_running(f"{tmp_path}/c/[0-9a-f]*/bin/conda-unpack")
    assert not list((tmp_path / "c").glob("*.ready"))


def test_a_stop_while_activation_scripts_run_ends_them_and_what_they_started(tmp_path: Path) -> None:
    """The environment's activate.d scripts run in a process group of their own: a stop ends them
    and what they started, and the command is not run."""
    grandchild = tmp_path / "grandchild"
    busy = f"sleep 60 &\necho $! > {grandchild}\nwait\n".encode()
    tarball = write_tar(tmp_path / "env.tar.gz", [*tiny_env(), M("etc/conda/activate.d/busy.sh", data=busy)])
    env = entry_env(MLSERVER_ENV_TARBALL=tarball, MLSERVER_ENV_CACHE_DIR=tmp_path / "c")
    proc = subprocess.Popen(
        [*ENTRYPOINT, "sh", "-c", "echo ran"],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not (grandchild.exists() and grandchild.read_text().strip()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 143 and "ran" not in out, err
    assert "stopped by SIGTERM" in error_line(subprocess.CompletedProcess(proc.args, 143, out, err))
    assert _gone(int(grandchild.read_text()))


def _gone(pid: int) -> bool:
    """Ended (a zombie not yet reaped by whoever inherited it counts), within a couple of seconds."""
    for _ in range(100):
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except FileNotFoundError:
            return True
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    return False


def test_a_kill_9_before_conda_unpack_set_its_death_signal_takes_it_along(tmp_path: Path) -> None:
    """PR_SET_PDEATHSIG does nothing for a parent already dead: a child forked just before its
    parent's kill -9 checks, once armed, that its parent is still there."""
    (tmp_path / "bin").mkdir()
    pidfile = tmp_path / "script-ran"
    forked = tmp_path / "forked"  # the child's pid, written before it arms its death signal
    (tmp_path / relocate.UNPACK_SCRIPT).write_text(
        f"import os, time\nopen({str(pidfile)!r}, 'w').write(str(os.getpid()))\ntime.sleep(60)\n"
    )
    # The child announces the fork, then waits until its parent is gone before it arms: the kill
    # lands between the fork and the prctl every time.
    code = f"""
import os, sys, time
from pathlib import Path
from entrypoint import relocate, worker
dies_with_parent = worker.dies_with_parent
def late(*args):
    arm, parent = dies_with_parent(*args), os.getpid()
    def armed_late():
        Path({str(forked)!r} + ".tmp").write_text(str(os.getpid()))
        os.rename({str(forked)!r} + ".tmp", {str(forked)!r})
        end = time.monotonic() + 60
        while os.getppid() == parent and time.monotonic() < end:
            time.sleep(0.01)
        arm()
    return armed_late
worker.dies_with_parent = late
relocate.run_conda_unpack(Path({str(tmp_path)!r}), Path(sys.executable))
"""
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO)
    deadline = time.monotonic() + 60
    while not forked.exists():
        assert proc.poll() is None, f"the start exited ({proc.returncode}) before it forked conda-unpack"
        assert time.monotonic() < deadline, "the start did not fork conda-unpack within 60 s"
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert _gone(int(forked.read_text())), "conda-unpack ran on after its start was killed"
    assert not pidfile.exists(), "conda-unpack's script ran after its start was killed"
