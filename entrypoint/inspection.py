"""`mlserver-entrypoint inspect`: what an environment archive holds, and whether a start of this
image would serve it.

The verdict is a start's, by a start's code: the archive is extracted by extract.Extractor into a
scratch tree (every name, type and mode, and the data only of the files the checks read: bin/,
conda-meta/, package metadata), then judged by the checks a start makes (activate.find_python,
activate.require, relocate.check_prefix_length) against the entry a start would use. The scratch
tree is removed afterwards, also after a stop (worker.py).
"""

from __future__ import annotations

import contextlib
import email.parser
import json
import os
import re
import shutil
import stat
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO

from entrypoint import activate, archive, fs, keys, log, models, relocate, settings, warm, worker
from entrypoint.entry import Entry
from entrypoint.errors import ArchiveError, ConfigError, EntrypointError
from entrypoint.extract import Extractor, Refused, limits_for
from entrypoint.models import ModelEnv
from entrypoint.settings import Settings
from entrypoint.source import PIN_ADVICE, Tarball, digests_of, locate, pin_mismatch
from entrypoint.worker import Message

# The files whose data the checks and the report read; every other file is created empty.
DATA = re.compile(
    r"bin/[^/]+|python\.exe|conda-meta/[^/]+\.json|include/python[^/]+/patchlevel\.h"
    r"|lib/python[^/]+/site-packages/[^/]+\.(dist-info/METADATA|egg-info/PKG-INFO|egg-info)"
)
TREE = "t"  # the scratch tree, relative to its folder: path lengths stay those at the entry
METADATA_HEAD = 64 << 10  # Name and Version are in the first lines of METADATA / PKG-INFO
PY_VERSION = re.compile(rb'#define\s+PY_VERSION\s+"([^"]+)"')
CONDA_META = re.compile(r"([^/]+)-([^-/]+)-([^-/]+)\.json")


@dataclass
class Report:
    tarball: str
    format: str
    sha256: str
    packed_bytes: int
    key: str  # the cache key, which names the entry (keys.key_digest)
    unpacked_bytes: int = 0
    files: int = 0
    directories: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    python: str | None = None
    interpreter: str | None = None  # bin/pythonX.Y, as packed
    platform: str | None = None  # "x86_64 64-bit Linux"
    packages: dict[str, str] = field(default_factory=dict)  # mlserver, mlserver-*, scikit-learn
    packed_prefix: str | None = None
    packed_prefix_length: int | None = None
    relocation: str = "none"
    cache_prefix: str = ""  # where a start with these settings unpacks it
    cached: bool = False
    will_work: bool = True
    exit_code: int = 0  # what a start would exit with
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def problem(self, line: str, exit_code: int) -> None:
        self.problems.append(line)
        self.exit_code = self.exit_code or exit_code
        self.will_work = False


def main(args: list[str], send: Callable[[Message], None]) -> int:
    """`inspect [TARBALL] [--json]`: the reports, and the exit code a start would fail with.
    Without TARBALL: the server's environment and each model's own (models.py)."""
    as_json = "--json" in args
    rest = [a for a in args if a != "--json"]
    if len(rest) > 1 or any(a.startswith("-") for a in rest):
        raise ConfigError(f"usage: inspect [TARBALL] [--json] (got {' '.join(args)})")
    config = settings.load()
    wanted = [] if rest else _local_models(config)
    path = Path(rest[0]) if rest else _configured(config, need=not wanted)
    try:
        server = None if path is None else inspect(path, config, send)
        own = {m: _inspect_model(m, config, server, send) for m in wanted}
    except EntrypointError as exc:
        if as_json:  # a job parsing stdout still gets one object, saying what the error line says
            failed = {"tarball": path and str(path), "will_work": False, "exit_code": exc.exit_code}
            log.out(json.dumps({**failed, "problems": [exc.line]}, indent=1))
        raise
    log.out(_rendered(server, own, as_json))
    return _verdict(server, own)


def _configured(config: Settings, need: bool) -> Path | None:
    if config.tarball and settings.is_url(config.tarball):
        raise ConfigError("inspect reads a local archive", "download the URL and give the file")
    tarball = locate(config)
    if not isinstance(tarball, Tarball) and need:
        raise ConfigError("inspect what?", "give a TARBALL, or set MLSERVER_ENV_TARBALL")
    return tarball.path if isinstance(tarball, Tarball) else None


def _local_models(config: Settings) -> list[ModelEnv]:
    """The models with a tarball of their own that is a local file: inspect reads no URL."""
    found = models.find(config.models_dir)
    for model in (m for m in found if settings.is_url(m.tarball)):
        log.info(f"{model.label}: not inspected (inspect reads local archives: download it and give the file)")
    return [m for m in found if not settings.is_url(m.tarball)]


def _inspect_model(model: ModelEnv, config: Settings, server: Report | None, send: Callable[[Message], None]) -> Report:
    """A model's tarball, judged as a start judges it: also against the server's mlserver."""
    report = inspect(Path(model.tarball), warm.for_model(config, model), send)
    served = server.packages.get("mlserver") if server is not None else _image_mlserver()
    problem = models.version_problem(model, report.packages.get("mlserver"), served)
    if problem is not None:
        report.problem(problem.line, problem.exit_code)
    return report


def _image_mlserver() -> str | None:
    """The mlserver release of the `mlserver` on PATH: the one that serves without an environment."""
    program = shutil.which("mlserver")
    return None if program is None else models.mlserver_version(models.server_prefix(program))


def _rendered(server: Report | None, own: dict[ModelEnv, Report], as_json: bool) -> str:
    if not own:
        assert server is not None
        return json.dumps(asdict(server), indent=1) if as_json else render(server)
    if as_json:
        doc = {"server": server and asdict(server), "models": {m.name: asdict(r) for m, r in own.items()}}
        return json.dumps(doc, indent=1)
    parts = [] if server is None else [f"server environment\n{render(server)}"]
    return "\n\n".join([*parts, *(f"model {m.name} ({m.settings_file})\n{render(r)}" for m, r in own.items())])


def _verdict(server: Report | None, own: dict[ModelEnv, Report]) -> int:
    """0, or the error of the first environment a start would fail on, naming it."""
    for label, report in [("", server), *((f"{m.label}: ", r) for m, r in own.items())]:
        if report is not None and not report.will_work:
            message = f"{label}{report.tarball} will not work in this image: {report.problems[0]}"
            raise EntrypointError(message, "", report.exit_code)
    return 0


def inspect(path: Path, config: Settings, send: Callable[[Message], None]) -> Report:
    """Extract `path` into a scratch tree and judge it as a start with `config` would."""
    import tempfile

    with _opened(path) as raw:
        fmt = _format(raw, path)
        pin = config.tarball_sha256
        digests, size = digests_of(raw.fileno(), *keys.DIGESTS), os.fstat(raw.fileno()).st_size
        report = Report(str(path), fmt, digests["sha256"], size, digests[keys.key_digest(pin)])
        entry = Entry(config.cache_dir, report.key)
        report.cache_prefix, report.cached = str(entry.prefix), entry.marker.exists()
        if pin is not None and pin != report.sha256:  # a start's first check
            report.problem(
                f"{pin_mismatch(report.sha256, pin, 'a start refuses it')}; {PIN_ADVICE}", ConfigError.exit_code
            )
        scratch = tempfile.mkdtemp(prefix="mlserver-entrypoint-inspect-")
        send({"scratch": scratch})
        cwd = os.getcwd()
        try:
            os.chdir(scratch)
            os.mkdir(TREE, 0o700)
            if _extracted(raw, report, config, entry):
                _judge(Path(TREE), report, config, entry)
        finally:
            os.chdir(cwd)
            fs.remove_tree(scratch)
    return report


def _opened(path: Path) -> BinaryIO:
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the open
            raise ConfigError(f"{path}: not a regular file", "give the archive itself")
        return open(path, "rb")
    except OSError as exc:
        raise ConfigError(
            f"{path}: cannot open: {exc.strerror}", f"check the path and that uid {os.getuid()} can read it"
        ) from exc


def _format(raw: BinaryIO, path: Path) -> str:
    try:
        fmt = archive.detect_format(raw.read(512))
    except ArchiveError as exc:
        raise ArchiveError(f"{path}: {exc.message}", "pack the environment with conda-pack") from exc
    raw.seek(0)
    return fmt


def _extracted(raw: BinaryIO, report: Report, config: Settings, entry: Entry) -> bool:
    """Extract into the scratch tree as a start would; a rule's refusal is a problem, an archive
    that cannot be read is the error."""
    limits = limits_for(config.max_members, config.max_unpacked_bytes, entry.prefix)
    extractor = Extractor(Path(TREE), limits, data_of=lambda rel: DATA.fullmatch(rel) is not None)
    try:
        extractor.run(archive.members(raw))
        return True
    except Refused as exc:
        report.problem(f"the entrypoint would refuse {exc.line}" if exc.message.startswith("member ") else exc.line, 3)
        return False
    except ArchiveError as exc:
        raise exc.about(report.tarball) from exc
    finally:
        stats = extractor.stats
        report.files, report.directories, report.symlinks = stats.files, stats.dirs, stats.symlinks
        report.hardlinks, report.unpacked_bytes = stats.hardlinks, stats.bytes


def _judge(tree: Path, report: Report, config: Settings, entry: Entry) -> None:
    """The checks a server start makes, in its order, so the exit code is the one it fails with:
    the interpreter and mlserver (4), then the relocation (2); then the report's facts."""
    checks = (
        lambda: activate.find_python(tree, Path()),
        lambda: activate.require(tree, ("mlserver",), Path()),
        lambda: _relocation(tree, report, config, entry),
    )
    for check in checks:
        try:
            check()
        except EntrypointError as exc:
            report.problem(exc.line, exc.exit_code)
    _facts(tree, report)


def _relocation(tree: Path, report: Report, config: Settings, entry: Entry) -> None:
    script = relocate.read_unpack_script(tree)
    if script is None:
        report.notes.append(f"no {relocate.UNPACK_SCRIPT}: not a conda-pack archive, paths inside are not relocated")
        return
    how = f"in-process, by {script.known}'s rules" if script.in_process(config.relocate) else (
        f"by running its {relocate.UNPACK_SCRIPT}")  # fmt: skip
    report.relocation = f"{how} ({len(script.records)} files listed)"
    placeholders = sorted({ph for _, ph, _ in script.records}, key=len)
    if placeholders:
        report.packed_prefix, report.packed_prefix_length = placeholders[0], len(placeholders[0])
    relocate.check_prefix_length(script.records, entry.prefix)


def _facts(tree: Path, report: Report) -> None:
    """Interpreter, platform, Python version and the packages that matter, from the tree."""
    report.interpreter, report.platform = _interpreter(tree)
    conda = {_canonical(m[1]): m[2] for p in tree.glob("conda-meta/*.json") if (m := CONDA_META.fullmatch(p.name))}
    dist = dict(filter(None, map(_metadata, tree.glob("lib/python*/site-packages/*.*-info*"))))
    versions = sorted(p.name.removeprefix("python") for p in tree.glob("lib/python[0-9]*") if p.is_dir())
    report.python = _patchlevel(tree) or conda.get("python") or (versions[0] if len(versions) == 1 else None)
    if len(versions) > 1:
        report.notes.append(f"several lib/pythonX.Y folders: {', '.join(versions)}")
    packages = {**conda, **dist}
    report.packages = {
        n: v for n, v in sorted(packages.items()) if n in ("mlserver", "scikit-learn") or n.startswith("mlserver-")
    }
    if "mlserver" in report.packages and not any(n.startswith("mlserver-") for n in report.packages):
        report.notes.append("no mlserver runtime package (mlserver-sklearn, mlserver-xgboost, …) found")


def _interpreter(tree: Path) -> tuple[str | None, str | None]:
    """The file bin/python is, relative to the environment, and the platform it is built for."""
    if (tree / "python.exe").exists():
        return None, "Windows"
    root = tree.resolve()
    for name in ("python", "python3"):
        real = Path(os.path.realpath(tree / "bin" / name))
        if real.is_file() and real.is_relative_to(root):
            with open(real, "rb") as f:
                header = f.read(64)
            elf = activate.elf_target(header)
            platform = activate.describe(elf) if elf else "macOS" if header.startswith(activate.MACHO) else None
            return str(real.relative_to(root)), platform
    return None, None


def _canonical(name: str) -> str:
    """PEP 503: `Scikit_Learn` and `scikit-learn` are one project."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _metadata(path: Path) -> tuple[str, str] | None:
    """(name, version) from a METADATA, PKG-INFO or egg-info file."""
    if path.is_dir():
        path = path / ("METADATA" if path.name.endswith(".dist-info") else "PKG-INFO")
    try:
        with open(path, "rb") as f:
            head = f.read(METADATA_HEAD).decode("utf-8", "replace").split("\n\n", 1)[0]
    except OSError:
        return None
    msg = email.parser.HeaderParser().parsestr(head)
    name, version = msg.get("Name"), msg.get("Version")
    return (_canonical(name), version) if name and version else None


def _patchlevel(tree: Path) -> str | None:
    for path in tree.glob("include/python*/patchlevel.h"):
        with open(path, "rb") as f:
            if found := PY_VERSION.search(f.read(METADATA_HEAD)):
                return found.group(1).decode()
    return None


def render(report: Report) -> str:
    """The report as aligned lines, problems and notes last."""
    packages = ", ".join(f"{n} {v}" for n, v in report.packages.items()) or "none found"
    prefix = f"{report.packed_prefix} ({report.packed_prefix_length} characters)" if report.packed_prefix else "unknown"
    cached = "already unpacked" if report.cached else "not unpacked yet"
    rows = [
        ("archive", f"{report.tarball} ({report.format}, {report.packed_bytes / 1e6:.1f} MB)"),
        ("sha256", report.sha256),
        ("python", report.python or "unknown"),
        ("interpreter", f"{report.interpreter or 'none'} ({report.platform or 'unknown platform'})"),
        ("packages", packages),
        ("packed prefix", prefix),
        ("relocation", report.relocation),
        ("members", f"{report.files} files, {report.directories} directories, {report.symlinks} symlinks, "
                    f"{report.hardlinks} hardlinks"),
        ("unpacked size", f"{report.unpacked_bytes / 1e6:.1f} MB"),
        ("cache entry", f"{report.cache_prefix} ({len(report.cache_prefix)} characters, {cached})"),
        ("this image", "will work" if report.will_work else "will NOT work"),
    ]  # fmt: skip
    lines = [f"{k + ':':<15}{v}" for k, v in rows]
    return "\n".join([*lines, *(f"  problem: {p}" for p in report.problems), *(f"  note: {n}" for n in report.notes)])


def undo(messages: list[Message]) -> tuple[str, str]:
    """After a stop ended the worker: remove its scratch tree, for as long as a stop's cleanup may take."""
    for scratch in (m["scratch"] for m in messages if "scratch" in m):
        with contextlib.suppress(OSError):
            if not fs.remove_tree(scratch, time.monotonic() + worker.UNDO_TIME):
                log.info(f"left part of inspect's scratch tree {scratch}; remove it (rm -rf {scratch})")
    return "inspecting", "nothing was written"
