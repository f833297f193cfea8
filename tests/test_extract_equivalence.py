"""The hand-written tar reader and extractor produce the tree GNU tar produces (issues 3 and 5)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from archives import content_tree

from entrypoint import archive, extract

LIMITS = extract.Limits(max_members=10**6, max_unpacked_bytes=1 << 40)


@pytest.mark.parametrize("fixture", ["small_tarball", "seed"])
def test_same_tree_as_gnu_tar(fixture: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    value = request.getfixturevalue(fixture)
    tarball = value if isinstance(value, Path) else value.tarball
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    theirs.mkdir()
    with open(tarball, "rb") as raw:
        stats = extract.extract(archive.members(raw), ours, LIMITS)
    subprocess.run(["tar", "-xf", str(tarball), "-C", str(theirs), "--no-same-owner"], check=True)
    a, b = content_tree(ours, mtimes=True), content_tree(theirs, mtimes=True)
    assert a.keys() == b.keys()
    # Same content, links and mtimes (seconds: what .pyc files record); the permission bits are
    # GNU tar's minus group/other write, as documented.
    for rel, (kind, mode, content) in b.items():
        assert a[rel][0] == kind and a[rel][2] == content, rel
        if kind == "file":
            assert a[rel][1] == (mode & 0o755) | 0o600, rel
    assert stats.files == sum(1 for k, _, _ in b.values() if k == "file")
