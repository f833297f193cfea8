"""Environments packed by other tools than conda-pack: GNU tar, bsdtar, Info-ZIP, 7-Zip, and the
standard library's tarfile and zipfile as a user's own script would call them. (star is not
packaged by Debian, so CI could not run it.)

Each writer lays out a small environment (tests/archives.py `tiny_env`) as a real directory, with
the file-system details its tool records (ACLs, extended attributes, sparse files, names that are
no UTF-8), and packs it with the tool itself. The tools come from Debian (scripts/install-system-deps).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tarfile
import warnings
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from archives import M, compress, tiny_env
from support import unavailable

SEVEN_ZIP = ("7zz", "7z", "7za")  # Debian's 7zip package installs 7zz; p7zip-full 7z and 7za
TOP = ["bin", "conda-meta", "lib", "share"]  # the environment's top-level names, for tools given a list
NON_UTF8 = "lib/caf\udce9"  # b"lib/caf\xe9" on disk: a Latin-1 name (os.fsencode's surrogateescape)
SPARSE_SIZE = 1 << 20


def env_members() -> list[M]:
    """The environment every writer packs: a real interpreter, symlinks, a few site-packages files."""
    return tiny_env(extra_files=4)


def write_tree(root: Path, members: Iterable[M]) -> Path:
    """Lay `members` out under `root` as files, directories, symlinks and hardlinks, with their modes and mtimes."""
    root.mkdir(parents=True, exist_ok=True)
    dirs: list[tuple[Path, float]] = []
    for m in members:
        path = root / m.name
        path.parent.mkdir(parents=True, exist_ok=True)
        if m.kind == "dir":
            path.mkdir(exist_ok=True)
            path.chmod(m.mode if m.mode is not None else 0o755)
            dirs.append((path, m.mtime))
            continue
        if m.kind == "file":
            path.write_bytes(m.data)
            path.chmod(m.mode if m.mode is not None else 0o644)
        elif m.kind == "symlink":
            path.symlink_to(m.target)
        elif m.kind == "hardlink":
            os.link(root / m.target, path)
        else:
            raise ValueError(f"a tree of this kind holds no {m.kind}")
        os.utime(path, (m.mtime, m.mtime), follow_symlinks=False)
    for path, mtime in reversed(dirs):  # after their contents, which change a directory's mtime
        os.utime(path, (mtime, mtime))
    return root


def sparse_file(path: Path, size: int = SPARSE_SIZE) -> None:
    """A file of `size` bytes that is mostly a hole: data at its middle and at its end only."""
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(size // 2)
        f.write(b"data")
        f.seek(size - 4)
        f.write(b"tail")


def need(tool: str, *alternatives: str) -> str:
    """The path of `tool` (or of the first alternative found); scripts/install-system-deps installs them."""
    for name in (tool, *alternatives):
        found = shutil.which(name)
        if found is not None:
            return found
    unavailable(f"{' or '.join((tool, *alternatives))} is missing: run scripts/install-system-deps (as root)")


def run(*args: str | Path, cwd: Path | None = None) -> None:
    proc = subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, errors="replace", check=False
    )
    assert proc.returncode == 0, f"{' '.join(map(str, args))} exited {proc.returncode}: {proc.stderr[-2000:]}"


# --- Writers: each takes an empty work directory and returns the archive it wrote there ----------

Writer = Callable[[Path], Path]


def tar_tool(
    tool: str, *options: str, out: str, names: list[str] | None = None, prepare: Callable[[Path], None] | None = None
) -> Writer:
    """`tool` (GNU tar, bsdtar) with `options`, of the environment as `-C env .` or as the names given."""

    def write(work: Path) -> Path:
        env = write_tree(work / "env", env_members())
        if prepare is not None:
            prepare(env)
        run(need(tool), *options, "-f", work / out, "-C", env, *(names or ["."]))
        return work / out

    return write


def gnu_tar(*options: str, **how: Any) -> Writer:
    return tar_tool("tar", *options, **how)


def bsdtar(*options: str, **how: Any) -> Writer:
    return tar_tool("bsdtar", "-c", *options, **how)


def with_acl(env: Path) -> None:
    run(need("setfacl"), "-m", "u:nobody:r,g:nogroup:r", env / "share/doc/README")
    run(need("setfacl"), "-d", "-m", "u:nobody:rx", env / "share")  # a directory's default ACL too


def with_xattr(env: Path) -> None:
    run(need("setfattr"), "-n", "user.origin", "-v", "packed by hand", env / "share/doc/README")
    run(need("setfattr"), "-n", "user.empty", env / "bin")


def with_acl_and_xattr(env: Path) -> None:
    with_acl(env)
    with_xattr(env)


def with_non_utf8_name(env: Path) -> None:
    (env / NON_UTF8).write_bytes(b"caf\xc3\xa9\n")


def with_sparse_file(env: Path) -> None:
    sparse_file(env / "lib/sparse.bin")


def gnu_tar_concatenated(how: str) -> Writer:
    """Two GNU tar archives made one: with `tar -A` (which drops the first's end marker), or by
    `cat` of the two tars, or of the two tar.gz files (each end marker stays)."""

    def write(work: Path) -> Path:
        tar = need("tar")
        env = write_tree(work / "env", env_members())
        first, second = work / "first.tar", work / "second.tar"
        run(tar, "--format=gnu", "-cf", first, "-C", env, "bin", "conda-meta")
        run(tar, "--format=gnu", "-cf", second, "-C", env, "lib", "share")
        if how == "tar-A":
            run(tar, "-A", "-f", first, second)
            return first
        if how == "cat":
            out = work / "cat.tar"
            out.write_bytes(first.read_bytes() + second.read_bytes())
            return out
        out = work / "cat.tar.gz"
        out.write_bytes(compress(first.read_bytes(), "tar.gz") + compress(second.read_bytes(), "tar.gz"))
        return out

    return write


def gnu_tar_then(fmt: str) -> Writer:
    """GNU tar's pax archive compressed afterwards (as `tar -cf - . | zstd` would be)."""

    def write(work: Path) -> Path:
        plain = gnu_tar("--format=posix", "-c", out="env.tar", names=TOP)(work)
        out = work / f"env.{fmt}"
        out.write_bytes(compress(plain.read_bytes(), fmt))
        return out

    return write


def info_zip(*options: str, out: str = "env.zip") -> Writer:
    """Info-ZIP's `zip -r` from inside the environment (-y: symlinks stored as links, not followed)."""

    def write(work: Path) -> Path:
        tool = need("zip")
        env = write_tree(work / "env", env_members())
        run(tool, "-q", "-r", *options, work / out, ".", cwd=env)
        return work / out

    return write


def info_zip_file_and_directory(*, file_first: bool, directory_entries: bool) -> Writer:
    """A zip holding a file `def` and a member `def/foo` (with a directory entry `def/` unless
    `directory_entries` is False): `zip -r` run twice into one archive, from two trees."""

    def write(work: Path) -> Path:
        tool = need("zip")
        env = write_tree(work / "env", env_members())
        (env / "def").write_text("a file named def\n")
        other = work / "other"
        (other / "def").mkdir(parents=True)
        (other / "def/foo").write_text("foo\n")
        out = work / "def.zip"
        passes = [(env, ["."]), (other, ["def"] if directory_entries else ["-D", "def"])]
        for root, args in passes if file_first else passes[::-1]:
            run(tool, "-q", "-r", "-y", out, *args, cwd=root)
        with zipfile.ZipFile(out) as zf:  # the point of the archive: both names are in it
            names = zf.namelist()
        assert "def" in names and "def/foo" in names and ("def/" in names) == directory_entries, names
        return out

    return write


def seven_zip(kind: str, *options: str) -> Writer:
    """7-Zip of the environment's top-level names, as a zip or a tar (`-snl`: symlinks as links);
    "tar.gz": the tar piped into 7-Zip's gzip."""

    def write(work: Path) -> Path:
        tool = need(*SEVEN_ZIP)
        env = write_tree(work / "env", env_members())
        quiet = ("-bd", "-bso0", "-bsp0")
        if kind != "tar.gz":
            out = work / f"env.{kind}"
            run(tool, "a", *quiet, f"-t{kind}", *options, out, *TOP, cwd=env)
            return out
        out = work / "env.tar.gz"
        tar = subprocess.Popen(
            [tool, "a", *quiet, "-ttar", *options, "-so", "unused.tar", *TOP], cwd=env, stdout=subprocess.PIPE
        )
        assert tar.stdout is not None
        with tar.stdout:
            subprocess.run([tool, "a", *quiet, "-tgzip", "-si", str(out)], stdin=tar.stdout, check=True)
        assert tar.wait() == 0
        return out

    return write


def tarfile_writer(
    fmt: int, mode: str, out: str, extra: Iterable[M] = (), global_pax: dict[str, str] | None = None
) -> Writer:
    """tarfile.add of a directory, as a user's packing script would: `arcname="."` for GNU format."""

    def write(work: Path) -> Path:
        env = write_tree(work / "env", [*env_members(), *extra])
        with tarfile.open(work / out, mode, format=fmt, pax_headers=global_pax) as tf:  # type: ignore[call-overload]
            if fmt == tarfile.GNU_FORMAT:
                tf.add(env, arcname=".")
            else:
                for name in sorted(os.listdir(env)):
                    tf.add(env / name, arcname=name)
        return work / out

    return write


def zipfile_writer(*duplicates: tuple[str, bytes]) -> Writer:
    """zipfile of the environment (symlinks as entries whose mode says S_IFLNK, as conda-pack
    writes them), then `duplicates` appended: zipfile warns about a name it holds, and writes it."""

    def write(work: Path) -> Path:
        env = write_tree(work / "env", env_members())
        out = work / "env.zip"
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
            for dirpath, dirnames, filenames in os.walk(env):
                for name in sorted(dirnames + filenames):
                    path = Path(dirpath, name)
                    arcname = str(path.relative_to(env))
                    if path.is_symlink():
                        info = zipfile.ZipInfo(arcname, (2024, 1, 1, 0, 0, 0))
                        info.create_system = 3
                        info.external_attr = (stat.S_IFLNK | 0o777) << 16
                        zf.writestr(info, os.readlink(path))
                    else:
                        zf.write(path, arcname)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "Duplicate name": the point of this archive
                for name, data in duplicates:
                    zf.writestr(name, data)
        return out

    return write


@dataclass(frozen=True)
class Case:
    id: str
    write: Writer


WRITERS = [
    # GNU tar, in each of its formats, and with what it records besides the files.
    Case("gnutar-gnu.tar.gz", gnu_tar("--format=gnu", "-cz", out="env.tar.gz")),
    Case("gnutar-posix.tar.xz", gnu_tar("--format=posix", "-cJ", out="env.tar.xz", names=TOP)),
    Case("gnutar-ustar.tar.bz2", gnu_tar("--format=ustar", "-cj", out="env.tar.bz2", names=TOP)),
    Case("gnutar-posix-then-zstd.tar.zst", gnu_tar_then("tar.zst")),
    Case("gnutar-acls", gnu_tar("--format=posix", "--acls", "-cz", out="env.tar.gz", prepare=with_acl)),
    Case("gnutar-xattrs", gnu_tar("--format=posix", "--xattrs", "-cz", out="env.tar.gz", prepare=with_xattr)),
    Case("gnutar-posix-non-utf8-name", gnu_tar("--format=posix", "-cz", out="env.tar.gz", prepare=with_non_utf8_name)),
    Case("gnutar-gnu-non-utf8-name", gnu_tar("--format=gnu", "-c", out="env.tar", prepare=with_non_utf8_name)),
    Case("gnutar-A-concatenated", gnu_tar_concatenated("tar-A")),
    Case("gnutar-cat-concatenated.tar", gnu_tar_concatenated("cat")),
    Case("gnutar-cat-concatenated.tar.gz", gnu_tar_concatenated("cat-gz")),
    Case(
        "gnutar-pax-global-header",
        gnu_tar(
            "--format=posix",
            "--pax-option=globexthdr.name=/GlobalHead.%n,comment=packed-by-ci",
            "-cz",
            out="env.tar.gz",
            names=TOP,
        ),
    ),
    Case("gnutar-sparse-gnu", gnu_tar("--sparse", "--format=gnu", "-cz", out="env.tar.gz", prepare=with_sparse_file)),
    *(
        Case(
            f"gnutar-sparse-pax-{version}",
            gnu_tar(
                "--sparse",
                "--format=posix",
                f"--sparse-version={version}",
                "-cz",
                out="env.tar.gz",
                names=TOP,
                prepare=with_sparse_file,
            ),
        )
        for version in ("0.1", "1.0")
    ),
    # bsdtar (libarchive): its default (restricted pax), its other formats, its zip.
    Case("bsdtar-default.tar.gz", bsdtar("-z", out="env.tar.gz")),
    Case("bsdtar-pax.tar.xz", bsdtar("--format", "pax", "-J", out="env.tar.xz", names=TOP)),
    Case("bsdtar-ustar.tar.bz2", bsdtar("--format", "ustar", "-j", out="env.tar.bz2", names=TOP)),
    Case("bsdtar-gnutar.tar.zst", bsdtar("--format", "gnutar", "--zstd", out="env.tar.zst")),
    Case("bsdtar-zip", bsdtar("--format", "zip", out="env.zip", names=TOP)),
    Case(
        "bsdtar-pax-acls-xattrs",
        bsdtar(
            "--format",
            "pax",
            "--acls",
            "--xattrs",
            "-z",
            out="env.tar.gz",
            prepare=with_acl_and_xattr,
        ),
    ),
    Case("bsdtar-pax-non-utf8-name", bsdtar("--format", "pax", out="env.tar", prepare=with_non_utf8_name)),
    Case("bsdtar-sparse", bsdtar("--format", "pax", "-z", out="env.tar.gz", prepare=with_sparse_file)),
    # Info-ZIP: symlinks followed (the default) or stored (-y); a file and a directory of one name.
    Case("infozip-r", info_zip()),
    Case("infozip-ry", info_zip("-y")),
    Case("infozip-file-def-then-dir-def", info_zip_file_and_directory(file_first=True, directory_entries=True)),
    Case("infozip-file-def-then-def-foo", info_zip_file_and_directory(file_first=True, directory_entries=False)),
    Case("infozip-dir-def-then-file-def", info_zip_file_and_directory(file_first=False, directory_entries=True)),
    # 7-Zip: symlinks followed by default, stored as links with -snl.
    Case("7zip-zip", seven_zip("zip")),
    Case("7zip-zip-snl", seven_zip("zip", "-snl")),
    Case("7zip-tar", seven_zip("tar")),
    Case("7zip-tar-snl", seven_zip("tar", "-snl")),
    Case("7zip-tar-snl.tar.gz", seven_zip("tar.gz", "-snl")),
    # The standard library, as a user's packing script would use it.
    Case("tarfile-pax.tar.gz", tarfile_writer(tarfile.PAX_FORMAT, "w:gz", "env.tar.gz")),
    Case("tarfile-gnu.tar.bz2", tarfile_writer(tarfile.GNU_FORMAT, "w:bz2", "env.tar.bz2")),
    Case(
        "tarfile-pax-global-header.tar.xz",
        tarfile_writer(tarfile.PAX_FORMAT, "w:xz", "env.tar.xz", global_pax={"comment": "packed by a script"}),
    ),
    Case(
        "tarfile-pax-non-utf8-name",
        tarfile_writer(tarfile.PAX_FORMAT, "w", "env.tar", extra=[M(NON_UTF8, data=b"x")]),
    ),
    Case("zipfile-duplicate-file", zipfile_writer(("lib/dup.txt", b"1"), ("lib/dup.txt", b"2"))),
    Case("zipfile-duplicate-of-a-packed-file", zipfile_writer(("share/doc/README", b"again\n"))),
    Case("zipfile-file-then-directory", zipfile_writer(("def", b"file"), ("def/", b""), ("def/foo", b"x"))),
    Case("zipfile-file-then-member-under-it", zipfile_writer(("def", b"file"), ("def/foo", b"x"))),
]
