"""`inspect` and a real start give one verdict on the same archive: the same exit code, and when
the start refuses a member, inspect names that member.

The archives: every hostile one of test_hostile.py, header mutants of a real conda-pack tarball,
and environments packed by other tools (tests/realworld.py). None holds mlserver, so a start of
`mlserver --version` always fails before it runs anything: on the archive (3), on the environment
(4) or on a setting (2).
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from archives import M, compress, ram_dir, real_tar_head, tiny_env, write_tar, write_zip
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from realworld import WRITERS, Writer
from support import entry_env, error_line, run_entrypoint
from test_hostile import CASES, FORMATS_AND_ZIP, Mutant, Site, mutants

MEMBER = re.compile(r"\bmember (.+?): ")
ESCAPES = {
    "dotdot": M("../../canary/fmt", data=b"x"),
    "symlink-out": M("lib/out", "symlink", target="../../../canary"),
}


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    """Where the archives and the caches go (in RAM where there is room: a start syncs its cache)."""
    with ram_dir("mlenv-agree-") as root:
        yield root


@pytest.fixture
def work(scratch: Path) -> Path:
    return Path(tempfile.mkdtemp(dir=scratch))


def hostile_site(work: Path) -> Site:
    """What test_hostile's builders take: only the canary folder is used, for absolute targets."""
    canary = work / "canary"
    canary.mkdir()
    (canary / "victim").write_text("must stay as it is\n")
    unused = work / "no-good-environment"
    return Site(root=work, cache=work / "cs", canary=canary, good=unused, good_prefix=unused)


def verdicts(tarball: Path, work: Path) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
    """inspect and a start of `tarball`, side by side, each with a fresh cache of its own (cache
    paths of one length: the prefix a start would unpack to is part of inspect's verdict)."""
    with ThreadPoolExecutor(2) as pool:
        inspected = pool.submit(
            run_entrypoint, ["inspect", str(tarball)], entry_env(MLSERVER_ENV_CACHE_DIR=work / "ci")
        )
        started = pool.submit(
            run_entrypoint,
            ["mlserver", "--version"],
            entry_env(MLSERVER_ENV_TARBALL=tarball, MLSERVER_ENV_CACHE_DIR=work / "cs"),
        )
        return inspected.result(), started.result()


def the_error(proc: subprocess.CompletedProcess[str]) -> str:
    return error_line(proc) if proc.returncode != 0 else "(no error)"


def assert_agree(tarball: Path, work: Path) -> None:
    """inspect exits as the start does, and names the member the start refuses."""
    inspected, started = verdicts(tarball, work)
    said, did = the_error(inspected), the_error(started)
    code, start_code = inspected.returncode, started.returncode
    both = f"\n  inspect (exit {code}): {said}\n  start   (exit {start_code}): {did}"
    assert code == start_code, f"inspect and the start exit differently:{both}"
    named = MEMBER.search(did.split(str(tarball), 1)[-1])  # after the archive's path, which could hold anything
    if named is not None:
        assert f"member {named[1]}:" in said, f"the start refuses member {named[1]}, inspect does not name it:{both}"


@pytest.mark.parametrize("build", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_archive(work: Path, build: Callable[[Site], list[M]]) -> None:
    """Each archive of test_hostile.py: inspect's verdict is the start's."""
    tarball = write_tar(work / "hostile.tar.gz", tiny_env() + build(hostile_site(work)))
    assert_agree(tarball, work)


@pytest.mark.parametrize("escape", sorted(ESCAPES))
@pytest.mark.parametrize("fmt", FORMATS_AND_ZIP)
def test_escape_in_every_format(work: Path, fmt: str, escape: str) -> None:
    """A `..` member and a symlink out of the environment, in every format: one verdict."""
    hostile_site(work)  # the canary folder the escapes aim at
    path, members = work / f"hostile.{fmt}", [*tiny_env(), ESCAPES[escape]]
    tarball = write_zip(path, members) if fmt == "zip" else write_tar(path, members, fmt)
    assert_agree(tarball, work)


class Head:
    """The first members of a real conda-pack tarball, and the offset of each header in them."""

    def __init__(self, data: bytes, offsets: list[int]) -> None:
        self.data, self.offsets = data, offsets

    def __repr__(self) -> str:  # hypothesis prints the test's arguments with a failing example
        return f"Head({len(self.data)} bytes, {len(self.offsets)} headers)"


class Shown:
    """A mutant as hypothesis reports it: its format and what was done, not its 250 kB."""

    def __init__(self, mutant: Mutant) -> None:
        self.mutant = mutant

    def __repr__(self) -> str:
        return f"Mutant({self.mutant.fmt}, {', '.join(self.mutant.ops)})"


@pytest.fixture(scope="module")
def real_head(small_tarball: Path) -> Head:
    """The first ~250 kB of the real bare Python 3.8 tarball (test_hostile's mutants start from it)."""
    head = Head(*real_tar_head(small_tarball))
    assert len(head.offsets) > 10
    return head


def check_mutant(scratch: Path, real_head: Head, data: st.DataObject) -> None:
    mutant = data.draw(mutants(real_head.data, real_head.offsets).map(Shown)).mutant
    work = Path(tempfile.mkdtemp(dir=scratch))
    tarball = work / f"mutant.{mutant.fmt}"
    tarball.write_bytes(compress(mutant.data, mutant.fmt))
    assert_agree(tarball, work)


@settings(max_examples=15, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_header_mutants(scratch: Path, real_head: Head, data: st.DataObject) -> None:
    """Headers of a real conda-pack tarball mutated (test_hostile's mutants): one verdict."""
    check_mutant(scratch, real_head, data)


@pytest.mark.slow
@settings(max_examples=200, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_header_mutants_many(scratch: Path, real_head: Head, data: st.DataObject) -> None:
    """The same, with many more mutants."""
    check_mutant(scratch, real_head, data)


@pytest.mark.parametrize("write", [c.write for c in WRITERS], ids=[c.id for c in WRITERS])
def test_archive_written_by_another_tool(work: Path, write: Writer) -> None:
    """An environment packed by GNU tar, bsdtar, star, Info-ZIP, 7-Zip, tarfile or zipfile: one verdict."""
    assert_agree(write(work), work)
