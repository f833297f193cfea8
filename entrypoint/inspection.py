"""`mlserver-entrypoint inspect`: what an environment archive holds and whether it can run here.

Reads the archive as one forward stream of members (the extractor's reader), so nothing is
written to disk and memory stays flat: only small members are read, and only their first bytes
(an interpreter's ELF header, a METADATA header block, the conda-unpack script). The verdict
uses the same rules a start applies (interpreter platform, mlserver present, prefix length for
the configured cache directory, member and size limits), so "will work" here means a start
would get past them.
"""

from __future__ import annotations

import email.parser
import json
import os
import posixpath
import re
import stat
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from entrypoint import archive, log, relocate
from entrypoint.activate import MACHO, NOT_EXECUTABLE, _describe, _elf_target, _host_target, no_python_advice
from entrypoint.archive import Kind, Member
from entrypoint.cache import Entry
from entrypoint.errors import ArchiveError, ConfigError, EntrypointError, EnvError, error_line
from entrypoint.extract import (
    KEPT_PATH_COST,
    MAX_KEPT_PATHS,
    check_symlink,
    normalize,
    too_many_bytes,
    too_many_members,
    too_many_paths,
)
from entrypoint.settings import Settings
from entrypoint.source import Tarball, locate, pin_mismatch, sha256_file

NAME_MAX = 255  # bytes in one path component on ext4, xfs, tmpfs (the cache's usual filesystems)
PATH_MAX = 4096  # bytes in a path the kernel accepts, its terminating NUL included
UNSAFE_KEPT = 5  # a hostile archive may have millions of bad members; the report names the first ones
METADATA_HEAD = 64 << 10  # Name and Version are in the first lines of METADATA / PKG-INFO
UNPACK_SCRIPT_MAX = 64 << 20  # conda-unpack of a 17,000-file environment is ~1 MB

LIB_PYTHON = re.compile(r"lib/python(\d+\.\d+)/")
PATCHLEVEL = re.compile(r"include/python\d+\.\d+[a-z]*/patchlevel\.h")
PY_VERSION = re.compile(rb'#define\s+PY_VERSION\s+"([^"]+)"')
INTERPRETER = re.compile(r"bin/python(\d+(\.\d+)?)?")
DIST_INFO = re.compile(r"lib/python\d+\.\d+/site-packages/[^/]+\.(dist-info/METADATA|egg-info/PKG-INFO|egg-info)")
CONDA_META = re.compile(r"conda-meta/([^/]+)-([^-/]+)-([^-/]+)\.json")


def canonical(name: str) -> str:
    """PEP 503 normalized project name: `Scikit_Learn` and `scikit-learn` are one project."""
    return re.sub(r"[-_.]+", "-", name).lower()


def interesting(name: str) -> bool:
    return name in ("mlserver", "scikit-learn") or name.startswith("mlserver-")


@dataclass
class Report:
    tarball: str
    format: str
    sha256: str
    packed_bytes: int
    unpacked_bytes: int = 0
    files: int = 0
    directories: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    python: str | None = None
    interpreter: str | None = None  # bin/pythonX.Y as packed
    platform: str | None = None  # e.g. "x86_64 64-bit Linux"
    packages: dict[str, str] = field(default_factory=dict)  # mlserver, mlserver-*, scikit-learn
    packed_prefix: str | None = None
    packed_prefix_length: int | None = None
    relocation: str = "none"  # how a start relocates it: in-process by a known release's rules, or the script
    cache_prefix: str = ""  # where a start with this image's settings would unpack it
    cached: bool = False
    will_work: bool = True
    exit_code: int = 0  # what a start would exit with: 2 for a setting to change, 3 archive, 4 environment
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def problem(self, message: str, error: type[EntrypointError] = EnvError) -> None:
        self.problems.append(message)
        self.exit_code = self.exit_code or error.exit_code


class _Scan:
    """What one pass over the members collects; the verdict is made from it afterwards."""

    def __init__(self, name_max: int = NAME_MAX, path_room: int = PATH_MAX) -> None:
        # bin/ only: the interpreter and mlserver live there (a conda env's bin/python links to
        # bin/python3.X); a kind per member would cost ~30 MB on a 300,000-file environment.
        self.kinds: dict[str, Kind] = {}
        self.links: dict[str, str] = {}  # symlink or hardlink member -> its target (relative path)
        self.headers: dict[str, bytes] = {}  # interpreter candidates -> first 64 bytes
        self.modes: dict[str, int] = {}  # interpreter candidates -> mode as packed
        self.lib_versions: set[str] = set()
        self.full_version: str | None = None
        self.dist: dict[str, str] = {}
        self.conda: dict[str, str] = {}
        self.unpack_script: str | None = None
        self.unpack_script_too_big = False
        self.unsafe: list[str] = []
        self.members = 0
        # The extractor's rules that need no memory per file: its directories (implied ones too)
        # and the symlinks with their targets as packed. Duplicate files, a member under a file and
        # a hardlink to a file the archive lacks need a set of every file name: a start finds those.
        self.dirs: set[str] = {""}
        self.symlinks: dict[str, str] = {}
        self.name_max = name_max  # of the cache's filesystem
        self.path_room = path_room  # bytes left for a member's name after the entry's prefix
        self.stopped_at: str | None = None  # the member over a limit: a start stops there, so does the scan
        self.kept = 0  # the extractor's count of the directory and symlink paths it keeps (its memory bound)

    def refuse(self, message: str) -> None:
        if len(self.unsafe) < UNSAFE_KEPT:
            self.unsafe.append(message)

    def add(self, m: Member, report: Report) -> None:
        self.members += 1
        try:
            rel = normalize(m.name)
            link = normalize(m.linkname) if m.kind is Kind.HARDLINK else m.linkname
        except ArchiveError as exc:
            self.refuse(str(exc))
            return
        if m.kind is Kind.OTHER:
            self.refuse(f"member {m.name}: is a {m.describe}")
            return
        self._place(rel, link, m)
        if rel.startswith("bin/"):
            self.kinds[rel] = m.kind
        if m.kind is Kind.DIR:
            report.directories += 1
        elif m.kind is Kind.SYMLINK:
            report.symlinks += 1
            if rel.startswith("bin/"):  # what `resolve` follows; others would only cost memory
                self.links[rel] = posixpath.normpath(posixpath.join(posixpath.dirname(rel), link))
        elif m.kind is Kind.HARDLINK:
            report.hardlinks += 1
            if rel.startswith("bin/"):
                self.links[rel] = link
        else:
            report.files += 1
            report.unpacked_bytes += m.size
            self._read_file(rel, m)
        if (found := LIB_PYTHON.match(rel)) is not None:
            self.lib_versions.add(found.group(1))
        if (meta := CONDA_META.fullmatch(rel)) is not None:
            self.conda[canonical(meta.group(1))] = meta.group(2)

    def _place(self, rel: str, link: str, m: Member) -> None:
        """Where the extractor would refuse this member: the rules of extract.Extractor.add."""
        if rel == "":
            if m.kind is not Kind.DIR:
                self.refuse(f"member {m.name}: a {m.kind.value} in place of the environment's root")
            return
        if len(rel) * 4 > self.name_max or len(rel) * 4 > self.path_room:  # UTF-8: up to 4 bytes a character
            encoded = rel.encode("utf-8", "surrogateescape")
            if len(encoded) >= self.path_room or any(len(c) > self.name_max for c in encoded.split(b"/")):
                self.refuse(f"member {m.name[:200]}: its name is too long for the cache's filesystem")
                return
        parent, missing = rel.rpartition("/")[0], []
        while parent not in self.dirs:
            if parent in self.symlinks:
                self.refuse(f"member {m.name}: would be written through the symlink {parent}")
                return
            missing.append(parent)
            parent = parent.rpartition("/")[0]
        self.dirs.update(missing)
        self.kept += sum(KEPT_PATH_COST + len(d) for d in missing)
        if rel in self.symlinks or (rel in self.dirs and m.kind is not Kind.DIR):
            what = "symlink" if rel in self.symlinks else "directory"
            self.refuse(f"member {m.name}: duplicate name (already a {what})")
        elif m.kind is Kind.DIR:
            if rel not in self.dirs:
                self.kept += KEPT_PATH_COST + len(rel)
                self.dirs.add(rel)
        elif m.kind is Kind.SYMLINK:
            try:
                check_symlink(m.name, rel, link)
                self.symlinks[rel] = link
                self.kept += KEPT_PATH_COST + len(rel)
            except ArchiveError as exc:
                self.refuse(str(exc))
        elif m.kind is Kind.HARDLINK and (
            link in self.dirs or link in self.symlinks or link.rpartition("/")[0] not in self.dirs
        ):
            self.refuse(f"member {m.name}: hardlink to {m.linkname}, which is not a file of this archive")

    def escaping(self) -> Iterable[str]:
        """Symlinks whose chain resolves outside the environment on the unpacked tree, as the
        extractor's last check (os.path.realpath there) finds them."""
        for rel in self.symlinks:
            path: list[str] = []
            todo = rel.split("/")[::-1]
            hops = 0
            while todo and hops <= 40:  # more: a loop, which realpath leaves unresolved (inside)
                name = todo.pop()
                if name in ("", "."):
                    continue
                if name == "..":
                    if not path:
                        yield f"member {rel}: symlink chain resolves outside the environment"
                        break
                    path.pop()
                    continue
                path.append(name)
                target = self.symlinks.get("/".join(path))
                if target is not None:
                    hops += 1
                    path.pop()
                    todo.extend(target.split("/")[::-1])

    def _read_file(self, rel: str, m: Member) -> None:
        assert m.open is not None
        if INTERPRETER.fullmatch(rel) or rel == "python.exe":
            self.headers[rel] = _head(m, 64)
            self.modes[rel] = m.mode
        elif DIST_INFO.fullmatch(rel):
            name, version = _metadata(_head(m, METADATA_HEAD))
            if name and version:
                self.dist[canonical(name)] = version
        elif PATCHLEVEL.fullmatch(rel):
            found = PY_VERSION.search(_head(m, METADATA_HEAD))
            self.full_version = found.group(1).decode() if found else None
        elif rel == relocate.UNPACK_SCRIPT:
            if m.size > UNPACK_SCRIPT_MAX:
                self.unpack_script_too_big = True
            else:
                self.unpack_script = _head(m, m.size).decode("utf-8", "replace")

    def resolve(self, rel: str) -> str | None:
        """Follow in-archive links from `rel` to a regular file member in bin/, as the unpacked tree would."""
        for _ in range(40):
            if rel not in self.links:
                return rel if self.kinds.get(rel) is Kind.FILE else None
            rel = self.links[rel]
        return None


def _drain(m: Member) -> None:
    """Read a member's data to its end, as the extractor does, and drop it."""
    assert m.open is not None
    with m.open() as f:
        while f.read(archive.CHUNK):
            pass


def _head(m: Member, n: int) -> bytes:
    """At most `n` bytes from the start of a file member (the stream skips the rest)."""
    assert m.open is not None
    out = bytearray()
    with m.open() as f:
        while len(out) < n and (chunk := f.read(min(n - len(out), archive.CHUNK))):
            out += chunk
    return bytes(out)


def _metadata(head: bytes) -> tuple[str | None, str | None]:
    text = head.decode("utf-8", "replace").split("\n\n", 1)[0]
    msg = email.parser.HeaderParser().parsestr(text)
    return msg.get("Name"), msg.get("Version")


def inspect_tarball(path: Path, settings: Settings) -> Report:
    """Stream `path` once and judge it against this image and these settings."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the open forever
            raise ConfigError(f"{path}: not a regular file; give the archive itself")
        raw = open(path, "rb")  # noqa: SIM115 - closed below, after the member stream is done
    except OSError as exc:
        raise ConfigError(
            f"{path}: cannot open: {exc.strerror}; check the path and that uid {os.getuid()} can read it"
        ) from None
    with raw:
        try:
            fmt = archive.detect_format(raw.read(512))
        except ArchiveError as exc:
            raise ArchiveError(f"{path}: {exc}; pack the environment with conda-pack") from None
        raw.seek(0)
        report = Report(str(path), fmt, sha256_file(path), os.fstat(raw.fileno()).st_size)
        entry = Entry(settings.cache_dir, report.sha256)
        scan = _Scan(_name_max(settings.cache_dir), PATH_MAX - len(os.fsencode(entry.prefix)) - 1)
        try:
            for m in archive.members(raw):
                if scan.members >= settings.max_members or (
                    m.kind is Kind.FILE and report.unpacked_bytes + m.size > settings.max_unpacked_bytes
                ):  # a start stops here, before writing it: reading on could take hours (a bomb)
                    scan.stopped_at = m.name
                    break
                scan.add(m, report)
                if fmt == "zip" and m.kind is Kind.FILE:
                    _drain(m)  # a zip member's CRC and local header are checked only as it is read, as a start reads it
                if scan.kept > MAX_KEPT_PATHS:  # the extractor refuses the archive here (extract.too_many_paths)
                    scan.stopped_at = m.name
                    break
        except archive.CORRUPT as exc:
            raise archive.corrupt(exc, str(path)) from None
        except ArchiveError as exc:
            raise ArchiveError(f"{path}: {exc}") from None
        except OSError as exc:
            if exc.errno is not None:
                raise ConfigError(f"{path}: cannot read: {exc.strerror}; check the file and try again") from None
            raise archive.corrupt(exc, str(path)) from None  # a codec's (gzip.BadGzipFile), as extract.extract reads it
    _judge(report, scan, settings)
    return report


def _name_max(cache_dir: Path) -> int:
    """The longest file name the cache's filesystem takes (its nearest existing folder's)."""
    for folder in (cache_dir, *cache_dir.parents):
        try:
            return os.pathconf(folder, "PC_NAME_MAX")
        except (OSError, ValueError):
            continue
    return NAME_MAX


def _judge(report: Report, scan: _Scan, settings: Settings) -> None:
    """Problems in the order a start meets them, so the exit code is the one it would fail with:
    the extraction's refusals (3), the interpreter and mlserver (4), the relocation (2)."""
    notes = report.notes
    entry = Entry(settings.cache_dir, report.sha256)
    report.cache_prefix = str(entry.prefix)
    report.cached = entry.marker.exists()
    if settings.tarball_sha256 is not None and settings.tarball_sha256 != report.sha256:  # a start's first check
        report.problem(pin_mismatch(report.sha256, settings.tarball_sha256, "a start refuses it"), ConfigError)
    for unsafe in [*scan.unsafe, *scan.escaping()][:UNSAFE_KEPT]:
        report.problem(f"the entrypoint would refuse {unsafe}", ArchiveError)
    if scan.stopped_at is not None:
        if scan.kept > MAX_KEPT_PATHS:  # the extractor's words
            report.problem(too_many_paths(scan.stopped_at), ArchiveError)
        elif scan.members >= settings.max_members:
            report.problem(too_many_members(settings.max_members), ArchiveError)
        else:
            report.problem(too_many_bytes(settings.max_unpacked_bytes, scan.stopped_at), ArchiveError)
        notes.append(f"read up to member {scan.stopped_at} only: a start stops there")
        report.will_work = False
        return
    report.python = scan.full_version or scan.conda.get("python") or _one(scan.lib_versions)
    if len(scan.lib_versions) > 1:
        notes.append(f"several lib/pythonX.Y folders: {', '.join(sorted(scan.lib_versions))}")
    report.packages = {n: v for n, v in sorted({**scan.conda, **scan.dist}.items()) if interesting(n) and n != "python"}
    _judge_interpreter(report, scan)
    if "mlserver" not in report.packages and scan.kinds.get("bin/mlserver") is None:
        report.problem(
            "no mlserver; add `mlserver` and its runtime (e.g. `mlserver-sklearn`) to the environment's "
            "pip dependencies and pack it again"
        )
    elif not any(n.startswith("mlserver-") for n in report.packages):
        notes.append("no mlserver runtime package (mlserver-sklearn, mlserver-xgboost, …) found")

    if scan.unpack_script_too_big:
        notes.append(f"{relocate.UNPACK_SCRIPT} is over {UNPACK_SCRIPT_MAX >> 20} MiB; its prefix was not read")
    elif scan.unpack_script is None:
        notes.append(f"no {relocate.UNPACK_SCRIPT}: not a conda-pack archive, paths inside are not relocated")
    else:
        script = relocate.UnpackScript.parse(scan.unpack_script, f"{report.tarball}:{relocate.UNPACK_SCRIPT}")
        records = script.records
        report.relocation = (
            f"in-process, by {script.known}'s rules ({len(records)} files listed)"
            if script.in_process(settings.relocate)
            else f"by running its {relocate.UNPACK_SCRIPT} ({len(records)} files listed)"
        )
        placeholders = sorted({ph for _, ph, _ in records}, key=len)
        if placeholders:
            report.packed_prefix = placeholders[0]
            report.packed_prefix_length = len(placeholders[0])
        try:
            relocate.check_prefix_length(records, entry.prefix)
        except ConfigError as exc:
            report.problem(str(exc), ConfigError)
    report.will_work = not report.problems


def _judge_interpreter(report: Report, scan: _Scan) -> None:
    """The rules of activate.find_python, applied to the packed members."""
    if "python.exe" in scan.headers:
        report.platform = "Windows"
        report.problem("built for Windows; pack the environment on Linux")
        return
    target = next((t for t in map(scan.resolve, ("bin/python", "bin/python3")) if t is not None), None)
    if target is None:
        nested = sorted(d.partition("/")[0] for d in scan.dirs if d.count("/") == 1 and d.endswith("/bin"))
        report.problem(f"no bin/python; {no_python_advice(nested)}")
        return
    report.interpreter = target
    header = scan.headers.get(target, b"")
    if header.startswith(MACHO):
        report.platform = "macOS"
        report.problem(f"{target} is a macOS binary; pack the environment on Linux")
        return
    elf = _elf_target(header)
    if elf is None:
        report.problem(f"{target} is not an ELF executable; the environment was not built for Linux")
        return
    report.platform = _describe(elf)
    host = _host_target()
    if host is not None and elf != host:
        report.problem(
            f"{target} is built for {_describe(elf)}, this machine runs {_describe(host)}; "
            f"pack the environment on {_describe(host)}"
        )
    elif not scan.modes.get(target, 0o755) & 0o111:  # extracted as packed: find_python refuses it
        report.problem(NOT_EXECUTABLE.format(target))


def _one(values: Iterable[str]) -> str | None:
    found = sorted(values)
    return found[0] if len(found) == 1 else None


def render(report: Report) -> str:
    """The report as aligned text lines, problems last."""
    mb = 1e6
    packages = ", ".join(f"{n} {v}" for n, v in report.packages.items()) or "none found"
    prefix = f"{report.packed_prefix} ({report.packed_prefix_length} characters)" if report.packed_prefix else "unknown"
    rows = [
        ("archive", f"{report.tarball} ({report.format}, {report.packed_bytes / mb:.1f} MB)"),
        ("sha256", report.sha256),
        ("python", report.python or "unknown"),
        ("interpreter", f"{report.interpreter or 'none'} ({report.platform or 'unknown platform'})"),
        ("packages", packages),
        ("packed prefix", prefix),
        ("relocation", report.relocation),
        (
            "members",
            f"{report.files} files, {report.directories} directories, {report.symlinks} symlinks, "
            f"{report.hardlinks} hardlinks",
        ),
        ("unpacked size", f"{report.unpacked_bytes / mb:.1f} MB"),
        (
            "cache entry",
            f"{report.cache_prefix} ({len(report.cache_prefix)} characters, "
            f"{'already unpacked' if report.cached else 'not unpacked yet'})",
        ),
        ("this image", "will work" if report.will_work else "will NOT work"),
    ]
    lines = [f"{k + ':':<15}{v}" for k, v in rows]
    lines += [f"  problem: {p}" for p in report.problems]
    lines += [f"  note: {n}" for n in report.notes]
    return "\n".join(lines)


def main(args: list[str], settings: Settings) -> int:
    """`inspect [TARBALL] [--json]`; without TARBALL, the one MLSERVER_ENV_TARBALL names.

    Exits 0 when the environment will work in this image, otherwise with the code a start would
    fail with (after printing the whole report), so scripts can gate on it.
    """
    as_json = "--json" in args
    rest = [a for a in args if a != "--json"]
    if len(rest) > 1 or any(a.startswith("-") for a in rest):
        raise ConfigError(f"usage: inspect [TARBALL] [--json] (got {' '.join(args)})")
    target = rest[0] if rest else (settings.tarball or "")
    if "://" in target:
        raise ConfigError("inspect reads a local archive; download the URL and give the file")
    configured = None if rest else locate(settings)
    if rest:
        path = Path(rest[0])
    elif isinstance(configured, Tarball):
        path = configured.path
    else:
        raise ConfigError("inspect what? give a TARBALL, or set MLSERVER_ENV_TARBALL")
    try:
        report = inspect_tarball(path, settings)
    except EntrypointError as exc:
        if as_json:  # a job parsing stdout still gets one object, saying what the error line says
            problems = [error_line(exc)]
            failed = {"tarball": str(path), "will_work": False, "exit_code": exc.exit_code, "problems": problems}
            log.out(json.dumps(failed, indent=1))
        raise
    log.out(json.dumps(asdict(report), indent=1) if as_json else render(report))
    if report.will_work:
        return 0
    error = EntrypointError(f"{path} will not work in this image: {report.problems[0]}")
    error.exit_code = report.exit_code
    raise error
