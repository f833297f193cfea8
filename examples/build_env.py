"""Build a real conda-pack tarball offline, the way a data scientist's `conda pack` would.

No conda channel is reachable here, but conda-pack packs any prefix that has a `conda-meta/`
folder. So: copy a full CPython build (pyenv keeps them), make its interpreter relocatable,
pip-install the model's stack with that interpreter, add `conda-meta/`, and `conda-pack` it.
The model is trained with the environment's own interpreter, as the example does.

Outputs are cached under --cache-dir, keyed by everything that goes into them, so a test
session or a second `serve` builds once per machine.

    python examples/build_env.py --out examples/seed            # seed env + model
    python examples/build_env.py --python 3.10 --format tar.zst  # another combination
"""

from __future__ import annotations

import argparse
import filecmp
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

from filelock import FileLock

HERE = Path(__file__).resolve().parent
SEED = HERE / "seed"
FORMATS = {"tar.gz", "tgz", "tar.bz2", "tar.xz", "tar.zst", "zip", "tar"}
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mlserver-env-fixtures"


def find_python(version: str) -> Path:
    """The newest pyenv CPython build of `version` (a full prefix, with its shared library)."""
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    found = sorted(
        (p for p in root.glob(f"{version}.*") if (p / "bin" / f"python{version}").exists()),
        key=lambda p: [int(x) for x in p.name.split(".") if x.isdigit()],
    )
    if not found:
        sys.exit(f"build_env: no CPython {version} under {root}; install it with `pyenv install {version}`")
    return found[-1]


def recipe_key(version: str, requirements: str, fmt: str) -> str:
    h = hashlib.sha256()
    for part in (version, requirements, fmt, Path(__file__).read_text(), (SEED / "train.py").read_text()):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]


def run(*cmd: str | Path, **kw: object) -> None:
    subprocess.run([str(c) for c in cmd], check=True, **kw)  # type: ignore[call-overload]


def build_prefix(src: Path, prefix: Path, version: str, requirements: Path) -> Path:
    shutil.copytree(
        src,
        prefix,
        symlinks=True,
        ignore=shutil.ignore_patterns("test", "idlelib", "tkinter", "turtledemo"),
    )
    python = prefix / "bin" / f"python{version}"
    # pyenv links libpython through an absolute RUNPATH; make the interpreter relocatable.
    run("patchelf", "--set-rpath", "$ORIGIN/../lib", python)
    # The copied build's own scripts (pip, pydoc, idle, 2to3) name pyenv's interpreter in their #!
    # line: point them at the prefix's, as conda's would, so conda-pack makes them relocatable.
    for script in (prefix / "bin").iterdir():
        if script.is_file() and not script.is_symlink() and (head := script.read_bytes()[:256]).startswith(b"#!"):
            old = f"#!{src}/bin/".encode()
            if head.startswith(old):
                script.write_bytes(f"#!{prefix}/bin/".encode() + script.read_bytes()[len(old) :])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_REQUIRE_VIRTUALENV"))}
    run(
        python,
        "-m",
        "pip",
        "install",
        "-q",
        "--disable-pip-version-check",
        "--root-user-action=ignore",
        "-r",
        requirements,
        env=env,
    )
    (prefix / "conda-meta").mkdir()
    (prefix / "conda-meta" / "history").write_text(f"# built offline by {Path(__file__).name}\n")
    return python


def build(
    out: Path,
    version: str = "3.8",
    requirements: Path = SEED / "requirements.txt",
    fmt: str = "tar.gz",
    name: str = "old-sklearn",
    cache_dir: Path = DEFAULT_CACHE,
    model: bool = True,
) -> Path:
    """Build (or take from cache) `<out>/<name>.<fmt>` and `<out>/model.joblib`; return the tarball."""
    if fmt not in FORMATS:
        sys.exit(f"build_env: unknown format {fmt!r}; choose one of {sorted(FORMATS)}")
    key = recipe_key(version, requirements.read_text(), f"{fmt}/{name}/{model}")
    cached = cache_dir / key
    tarball_name, model_name = f"{name}.{fmt}", "model.joblib"
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_dir / f"{key}.lock")):  # concurrent test runs build each recipe once
        if not (cached / ".done").exists():
            _build_into(cached, key, version, requirements, fmt, name, model, tarball_name, model_name)
    out.mkdir(parents=True, exist_ok=True)
    for item in (tarball_name, model_name) if model else (tarball_name,):
        target = out / item
        if _same_copy(cached / item, target):
            continue  # left as it is: a new inode would make the entrypoint hash the tarball again
        if target.exists() or target.is_symlink():
            target.unlink()
        shutil.copy2(cached / item, target)  # a copy: callers may damage theirs on purpose
    return out / tarball_name


def _same_copy(source: Path, target: Path) -> bool:
    """`target` is an untouched copy of `source`: a regular file of the same size, mtime and bytes
    (the bytes too: a test may damage its copy on purpose and set the mtime back)."""
    try:
        a, b = source.stat(), target.lstat()
    except OSError:
        return False
    if not stat.S_ISREG(b.st_mode) or (a.st_size, a.st_mtime_ns) != (b.st_size, b.st_mtime_ns):
        return False
    return filecmp.cmp(source, target, shallow=False)


def _build_into(
    cached: Path,
    key: str,
    version: str,
    requirements: Path,
    fmt: str,
    name: str,
    model: bool,
    tarball_name: str,
    model_name: str,
) -> None:
    cache_dir = cached.parent
    work = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=cache_dir))
    try:
        python = build_prefix(find_python(version), work / name, version, requirements)
        if model:
            run(python, SEED / "train.py", work / model_name)
        run(
            sys.executable,
            "-m",
            "conda_pack.cli",
            "-q",
            "-p",
            work / name,
            "--format",
            fmt,
            "-o",
            work / tarball_name,
            "--n-threads",
            "-1",
        )
        shutil.rmtree(work / name)
        os.chmod(work / tarball_name, 0o644)  # conda-pack writes 0600; containers run as other uids
        (work / ".done").write_text(key + "\n")
        if cached.exists():
            shutil.rmtree(cached)
        work.rename(cached)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=SEED, help="folder to put the tarball and model in")
    parser.add_argument("--python", default="3.8", help="CPython X.Y of the environment")
    parser.add_argument("--requirements", type=Path, default=SEED / "requirements.txt")
    parser.add_argument("--format", default="tar.gz", choices=sorted(FORMATS))
    parser.add_argument("--name", default="old-sklearn")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--no-model", action="store_true", help="skip training (env without scikit-learn)")
    a = parser.parse_args()
    print(build(a.out, a.python, a.requirements, a.format, a.name, a.cache_dir, not a.no_model))


if __name__ == "__main__":
    main()
