"""`mlserver-entrypoint inspect`: its report checked against the archive, the unpacked environment
itself, and what a real start does with the same archive (issue 7)."""

from __future__ import annotations

import ast
import gzip
import hashlib
import io
import json
import os
import re
import tarfile
import tempfile
import zipfile
from pathlib import Path

import pytest
from archives import M, compress, end_of_archive, raw_header, tar_bytes, tiny_env, write_tar, zst_bomb
from conftest import Example
from support import entry_env, env_python, error_line, run_entrypoint

from entrypoint import relocate
from entrypoint.errors import EnvError

ENV_FACTS = """
import json, platform, sys, mlserver, sklearn
print(json.dumps([platform.python_version(), mlserver.__version__, sklearn.__version__, platform.machine()]))
"""


def inspect_json(tarball: Path, cache_dir: Path) -> tuple[int, dict[str, object], str]:
    proc = run_entrypoint(["inspect", str(tarball), "--json"], entry_env(MLSERVER_ENV_CACHE_DIR=cache_dir))
    return proc.returncode, json.loads(proc.stdout), proc.stderr


def listing(tarball: Path) -> tuple[int, int, str]:
    """Regular files, their bytes and bin/conda-unpack's text, read with the standard library."""
    files = size = 0
    script = ""
    with tarfile.open(tarball) as tf:
        for ti in tf:
            if ti.isreg():
                files += 1
                size += ti.size
            if ti.name == "bin/conda-unpack":
                script = tf.extractfile(ti).read().decode()  # type: ignore[union-attr]
    return files, size, script


def test_inspect_agrees_with_the_archive_and_the_environment(seed: Example, tmp_path: Path) -> None:
    # The environment, unpacked by a real start, says what it is.
    cache_dir = tmp_path / "c"
    env = entry_env(MLSERVER_ENV_TARBALL=seed.tarball, MLSERVER_ENV_CACHE_DIR=cache_dir)
    unpacked = run_entrypoint(["unpack"], env)
    assert unpacked.returncode == 0, unpacked.stderr
    prefix = Path(unpacked.stdout.splitlines()[-1])
    python, mlserver, sklearn, machine = env_python(prefix, ENV_FACTS)  # type: ignore[misc]

    before = sorted((p.name, p.stat().st_mtime_ns) for p in cache_dir.iterdir())
    code, report, _ = inspect_json(seed.tarball, cache_dir)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in cache_dir.iterdir()) == before  # it only read
    assert code == 0 and report["will_work"] is True and report["problems"] == []
    assert report["python"] == python and report["platform"] == f"{machine} 64-bit Linux"
    assert report["packages"] == {"mlserver": mlserver, "mlserver-sklearn": mlserver, "scikit-learn": sklearn}
    assert report["interpreter"] == f"bin/python{python.rsplit('.', 1)[0]}"
    assert report["cache_prefix"] == str(prefix) and report["cached"] is True  # the entry the start made

    # The standard library's reading of the archive agrees on counts, sizes and the packed prefix.
    files, size, script = listing(seed.tarball)
    assert (report["files"], report["unpacked_bytes"]) == (files, size)
    assert report["packed_bytes"] == seed.tarball.stat().st_size
    placeholder = re.search(r"^\('[^']+', '([^']+)', 'text'\),$", script, re.M)
    assert placeholder is not None and report["packed_prefix"] == placeholder.group(1)
    assert report["packed_prefix_length"] == len(placeholder.group(1))


def test_inspect_without_argument_reads_the_configured_tarball(small_tarball: Path, tmp_path: Path) -> None:
    env = entry_env(MLSERVER_ENV_TARBALL=small_tarball, MLSERVER_ENV_CACHE_DIR=tmp_path)
    proc = run_entrypoint(["inspect"], env)
    assert proc.returncode == 4  # what a start serving it would exit with: no mlserver
    assert f"archive:       {small_tarball} (tar.gz" in proc.stdout
    assert "no mlserver" in error_line(proc) and "mlserver-sklearn" in error_line(proc)
    assert "problem: no mlserver" in proc.stdout and "this image:    will NOT work" in proc.stdout
    assert re.search(r"^python:        3\.8\.\d+$", proc.stdout, re.M) and "packages:      none found" in proc.stdout
    assert re.search(
        r"^relocation:    in-process, by conda-pack 0\.9\.2's rules \(\d+ files listed\)$", proc.stdout, re.M
    )
    env["MLSERVER_ENV_RELOCATE"] = "conda-unpack"  # as a start would: the packed script, when told so
    assert "relocation:    by running its bin/conda-unpack" in run_entrypoint(["inspect"], env).stdout


def test_a_pin_the_tarball_does_not_match_is_reported_as_a_start_refuses_it(
    small_tarball: Path, tmp_path: Path
) -> None:
    """A CI job gating on `inspect` with the image's settings must fail where the start would."""
    env = entry_env(
        MLSERVER_ENV_TARBALL=small_tarball, MLSERVER_ENV_CACHE_DIR=tmp_path, MLSERVER_ENV_TARBALL_SHA256="a" * 64
    )
    proc = run_entrypoint(["inspect"], env)
    assert proc.returncode == 2 and "this image:    will NOT work" in proc.stdout, proc.stdout
    assert "MLSERVER_ENV_TARBALL_SHA256 pins aaaa" in error_line(proc)
    start = run_entrypoint(["unpack"], env)
    assert start.returncode == 2 and error_line(proc).split("this image: ")[1].split("; a start")[0] in error_line(
        start
    )
    env["MLSERVER_ENV_TARBALL_SHA256"] = hashlib.sha256(small_tarball.read_bytes()).hexdigest()
    proc = run_entrypoint(["inspect"], env)
    assert proc.returncode == 4 and "pins" not in proc.stdout  # the pin holds: only the missing mlserver is left


def _patched(
    small_tarball: Path, out: Path, machine: int | None = None, binary_record: bool = False, mode: int | None = None
) -> Path:
    """A small archive of the real interpreter and conda-unpack, with one defect a real env can have:
    an interpreter built for another machine or packed without its execute bits, or a binary file
    holding the packed prefix."""
    with tarfile.open(small_tarball) as src, tarfile.open(out, "w:gz") as dst:
        for ti in src:
            if not (ti.name.startswith("bin/python") or ti.name == "bin/conda-unpack"):
                continue
            data = src.extractfile(ti).read() if ti.isreg() else b""  # type: ignore[union-attr]
            if machine is not None and ti.name == "bin/python3.8":
                data = data[:18] + machine.to_bytes(2, "little") + data[20:]
            if mode is not None and ti.name == "bin/python3.8":
                ti.mode = mode
            if binary_record and ti.name == "bin/conda-unpack":
                data = data.replace(b"', 'text'),\n", b"', 'binary'),\n", 1)
            dst.addfile(ti, io.BytesIO(data) if ti.isreg() else None)
    return out


def test_wrong_architecture_is_reported_as_a_start_would_refuse_it(small_tarball: Path, tmp_path: Path) -> None:
    arm = _patched(small_tarball, tmp_path / "arm.tar.gz", machine=183)
    code, report, _ = inspect_json(arm, tmp_path / "c")
    assert code == 4 and report["platform"] == "aarch64 64-bit Linux" and not report["will_work"]
    arch = [p for p in report["problems"] if "built for aarch64" in p]  # type: ignore[union-attr]
    assert arch and "this machine runs x86_64 64-bit Linux" in arch[0]
    start = run_entrypoint(["unpack"], entry_env(MLSERVER_ENV_TARBALL=arm, MLSERVER_ENV_CACHE_DIR=tmp_path / "c"))
    assert start.returncode == 4 and arch[0].split(" is built for ")[1] in error_line(start)


def test_interpreter_without_execute_bits_is_reported_as_a_start_would_refuse_it(
    small_tarball: Path, tmp_path: Path
) -> None:
    tarball = _patched(small_tarball, tmp_path / "noexec.tar.gz", mode=0o644)
    code, report, _ = inspect_json(tarball, tmp_path / "c")
    assert code == 4 and not report["will_work"]
    found = [p for p in report["problems"] if "not executable" in p]  # type: ignore[union-attr]
    assert found and found[0].startswith("bin/python3.8 ")
    start = run_entrypoint(["unpack"], entry_env(MLSERVER_ENV_TARBALL=tarball, MLSERVER_ENV_CACHE_DIR=tmp_path / "c"))
    assert start.returncode == 4 and found[0].split(" ", 1)[1] in error_line(start)


def test_prefix_too_long_for_the_cache_dir_is_reported_as_a_start_would_refuse_it(
    small_tarball: Path, tmp_path: Path
) -> None:
    tarball = _patched(small_tarball, tmp_path / "binary.tar.gz", binary_record=True)
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="i") as short:  # /tmp/iXXXXXXXX/<key8>: 23 characters
        code, report, _ = inspect_json(tarball, Path(short))
    length = report["packed_prefix_length"]
    assert isinstance(length, int) and not any("prefix" in p for p in report["problems"])  # type: ignore[union-attr]

    long_dir = tmp_path / ("x" * length)  # entries go one level deeper: always longer than the packed prefix
    code, report, _ = inspect_json(tarball, long_dir)
    assert code == 4 and not report["will_work"]  # exits as serving it would: for the missing mlserver first
    too_long = [p for p in report["problems"] if "MLSERVER_ENV_CACHE_DIR" in p]  # type: ignore[union-attr]
    assert len(too_long) == 1 and f"{length}-character prefix" in too_long[0]
    start = run_entrypoint(["unpack"], entry_env(MLSERVER_ENV_TARBALL=tarball, MLSERVER_ENV_CACHE_DIR=long_dir))
    assert start.returncode == 2 and too_long[0] in error_line(start)


def test_corrupt_archive_is_one_error_line(small_tarball: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(small_tarball.read_bytes()[: 4 << 20])
    proc = run_entrypoint(["inspect", str(cut)], entry_env(MLSERVER_ENV_CACHE_DIR=tmp_path))
    assert proc.returncode == 3 and "corrupt or truncated" in error_line(proc)
    assert proc.stdout == ""
    # A job parsing --json still gets one object, with the error line's words and exit code.
    code, report, stderr = inspect_json(cut, tmp_path)
    assert code == 3 and report["tarball"] == str(cut) and report["will_work"] is False and report["exit_code"] == 3
    assert report["problems"] == [stderr.strip().splitlines()[-1].removeprefix("mlserver-entrypoint: error: ")]


def test_what_is_not_an_archive_file_is_one_error_line(tmp_path: Path) -> None:
    """A FIFO nobody writes to must not hang inspect; an empty file is named, with what to do."""
    fifo, empty = tmp_path / "fifo.tar.gz", tmp_path / "empty.tar.gz"
    os.mkfifo(fifo)
    empty.write_bytes(b"")
    for path, code, words in ((fifo, 2, "not a regular file"), (empty, 3, "not an archive")):
        proc = run_entrypoint(["inspect", str(path)], entry_env(MLSERVER_ENV_CACHE_DIR=tmp_path), timeout=60)
        line = error_line(proc)
        assert proc.returncode == code and words in line and str(path) in line, proc.stderr


MLSERVER = M("bin/mlserver", data=b"#!/bin/sh\n", mode=0o755)
DEFECTS = {  # members added to a tiny environment a start serves; each one makes the start refuse it
    "absolute symlink": [M("lib/evil", "symlink", target="/etc/passwd")],
    "symlink out": [M("lib/evil", "symlink", target="../../etc")],
    "symlink chain out": [M("lib/a", "symlink", target="."), M("lib/b", "symlink", target="a/../..")],
    "empty symlink": [M("lib/empty", "symlink", target="")],
    "through a symlink": [M("lib/libtiny.so/x", data=b"x")],
    "file over a directory": [M("share", data=b"x")],
    "root as a file": [M(".", data=b"x")],
    "hardlink to a symlink": [M("lib/hl", "hardlink", target="lib/libtiny.so")],
    "name too long": [M("lib/" + "n" * 300, data=b"x")],
    "symlink target too long": [M("lib/ll", "symlink", target="./" * 2100 + "libtiny.so")],
}


@pytest.mark.parametrize("defect", DEFECTS)
def test_archive_a_start_refuses_is_reported_with_its_exit_code(defect: str, tmp_path: Path) -> None:
    """Each defect a start refuses (exit 3) is a problem inspect reports, with the start's exit code."""
    tarball = write_tar(tmp_path / "env.tar.gz", [*tiny_env(), MLSERVER, *DEFECTS[defect]])
    env = entry_env(MLSERVER_ENV_TARBALL=tarball, MLSERVER_ENV_CACHE_DIR=tmp_path / "c")
    start = run_entrypoint(["unpack"], env)
    assert start.returncode == 3, start.stderr
    proc = run_entrypoint(["inspect", "--json"], env)
    report = json.loads(proc.stdout)
    assert proc.returncode == 3 and report["will_work"] is False and report["exit_code"] == 3, proc.stdout
    assert "the entrypoint would refuse member" in error_line(proc)
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").glob("*.ready"))
    fine = write_tar(tmp_path / "fine.tar.gz", [*tiny_env(), MLSERVER])  # the same without the defect
    assert run_entrypoint(["inspect", str(fine)], env).returncode == 0


def test_over_a_limit_is_exit_3_and_stops_reading_there(tmp_path: Path) -> None:
    """A start stops at the header that crosses a limit (exit 3, before the interpreter is looked
    for); inspect reports the same and does not decompress the rest (80 GiB of zeros took 30 s)."""
    bomb = zst_bomb(tmp_path / "bomb.tar.zst", "lib/bomb", 80 << 30, before=[*tiny_env(), MLSERVER])
    env = entry_env(MLSERVER_ENV_TARBALL=bomb, MLSERVER_ENV_CACHE_DIR=tmp_path / "c")
    start = run_entrypoint(["unpack"], env)
    assert start.returncode == 3 and "MLSERVER_ENV_MAX_UNPACKED_BYTES" in error_line(start)
    proc = run_entrypoint(["inspect"], env, timeout=20)
    assert proc.returncode == 3 and "MLSERVER_ENV_MAX_UNPACKED_BYTES" in error_line(proc), proc.stderr
    assert "member lib/bomb" in error_line(proc)

    no_python = write_tar(tmp_path / "members.tar.gz", [M(f"share/f{i}", data=b"x") for i in range(20)])
    env.update(MLSERVER_ENV_TARBALL=str(no_python), MLSERVER_ENV_MAX_MEMBERS="10")
    start = run_entrypoint(["unpack"], env)
    proc = run_entrypoint(["inspect"], env)
    assert start.returncode == proc.returncode == 3, (start.stderr, proc.stderr)
    assert "more than 10 members" in error_line(proc) and "more than 10 members" in error_line(start)


def test_directory_paths_past_the_extractors_bound_are_refused_as_a_start_does(tmp_path: Path) -> None:
    """20,000 directories named with 3,800 characters (a 100 kB tar.zst): a start refuses them past
    its bound on what it keeps; inspect held them all (118 MiB) and said only "no bin/python"."""
    deep = "/".join(["d" * 250] * 15)
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w", format=tarfile.PAX_FORMAT) as t:
        for i in range(3000):
            t.addfile(_dir_info(f"{deep}/{i:06d}"))
    tarball = tmp_path / "dirs.tar"
    tarball.write_bytes(tar.getvalue())
    env = entry_env(MLSERVER_ENV_TARBALL=tarball, MLSERVER_ENV_CACHE_DIR=tmp_path / "c")
    start = run_entrypoint(["unpack"], env)
    proc = run_entrypoint(["inspect"], env)
    assert start.returncode == proc.returncode == 3, (start.stderr, proc.stderr)
    assert "MiB of directory and symlink paths" in error_line(start)
    assert "MiB of directory and symlink paths" in error_line(proc)


def _dir_info(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, 0o755
    return info


@pytest.mark.parametrize("args", [["a", "b"], ["--yaml", "x.tar.gz"]])
def test_bad_arguments_are_refused(args: list[str], tmp_path: Path) -> None:
    proc = run_entrypoint(["inspect", *args], entry_env(MLSERVER_ENV_CACHE_DIR=tmp_path))
    assert proc.returncode == 2 and "usage: inspect" in error_line(proc)


def test_prefix_records_parse_like_python_does(small_tarball: Path) -> None:
    """One record per line, read by a regular expression or, for quotes and escapes, literal_eval:
    the same list Python gets by evaluating the whole literal, as conda-unpack itself does."""
    _, _, script = listing(small_tarball)
    odd = "('it\\'s', '/p', 'text'),\n(\"a\\\\b \\u00e9\\n\", '/p', 'binary'),\n"
    script = script.replace("_prefix_records = [\n", "_prefix_records = [\n" + odd, 1)
    start = script.index("_prefix_records = [") + len("_prefix_records = ")
    expected = ast.literal_eval(script[start : script.index("\n]\n", start) + 2])
    records = relocate.parse_prefix_records(script, "bin/conda-unpack")
    assert records == [tuple(r) for r in expected] and len(records) > 1000
    assert records[:2] == [("it's", "/p", "text"), ("a\\b \u00e9\n", "/p", "binary")]
    with pytest.raises(EnvError, match="cannot read its prefix records"):
        relocate.parse_prefix_records(script.replace("'text'),", "'text'", 1), "bin/conda-unpack")


def _flip_in_data(data: bytes, marker: bytes) -> bytes:
    at = data.index(marker)
    return data[:at] + bytes([data[at] ^ 0x20]) + data[at + 1 :]


def _corrupt_cases(tmp_path: Path) -> dict[str, Path]:
    members = [*tiny_env(), MLSERVER, M("lib/b.txt", data=b"hello, world")]
    tar = tar_bytes(members)
    stored_zip = tmp_path / "stored.zip"
    with zipfile.ZipFile(stored_zip, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("lib/b.txt", b"hello, world")
    renamed = stored_zip.read_bytes().replace(b"lib/b.txt", b"lib/c.txt", 1)  # the local header's name only
    head = tar_bytes(tiny_env(), end=False)
    far_future = raw_header("lib/t", b"%011o\0" % 1, mtime_field=b"\x80" + b"\xff" * 11) + b"a" + bytes(511)
    cases = {
        "gzip crc.tar.gz": _flip_in_data(gzip.compress(tar, compresslevel=0, mtime=0), b"hello"),
        "bzip2 data.tar.bz2": _flip_in_data(compress(tar, "tar.bz2"), compress(tar, "tar.bz2")[200:204]),
        "gzip then junk.tar.gz": compress(tar, "tar.gz") + b"JUNK" * 8,
        "bzip2 then junk.tar.bz2": compress(tar, "tar.bz2") + b"JUNK" * 8,
        "zip crc.zip": _flip_in_data(stored_zip.read_bytes(), b"hello"),
        "zip local name.zip": renamed,
        "time out of range.tar": head + far_future + end_of_archive(),
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    return {name: tmp_path / name for name in cases}


def test_what_a_start_finds_corrupt_inspect_finds_corrupt(tmp_path: Path) -> None:
    """inspect printed a traceback for a bad gzip CRC or bzip2 data (exit 1), and called zips with
    a bad CRC or a mismatched local header, or a time no clock holds, "will work" (exit 0)."""
    for name, path in _corrupt_cases(tmp_path).items():
        env = entry_env(MLSERVER_ENV_TARBALL=path, MLSERVER_ENV_CACHE_DIR=tmp_path / "c")
        start = run_entrypoint(["unpack"], env)
        assert start.returncode == 3, (name, start.stderr)
        proc = run_entrypoint(["inspect", str(path)], env)
        line = error_line(proc)
        assert proc.returncode == 3 and str(path) in line, (name, proc.stderr)
        assert error_line(start).removeprefix(f"{path}: ").split(" (")[0] in line, (name, line)
