"""The hand-written tar reader and extractor produce the tree GNU tar produces (issues 3 and 5)."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from pathlib import Path

import pytest

from entrypoint import archive, extract

LIMITS = extract.Limits(max_members=10**6, max_unpacked_bytes=1 << 40)


def tree(root: Path) -> dict[str, tuple[str, int, object]]:
    """kind, permission bits and content (sha256 / link target) of everything under root."""
    out: dict[str, tuple[str, int, object]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            rel = str(path.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", 0, os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", 0, None)
            else:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                out[rel] = ("file", stat.S_IMODE(st.st_mode), (digest, st.st_mtime_ns // 10**9))
    return out


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
    a, b = tree(ours), tree(theirs)
    assert a.keys() == b.keys()
    # Same content, links and mtimes (seconds: what .pyc files record); the permission bits are
    # GNU tar's minus group/other write, as documented.
    for rel, (kind, mode, content) in b.items():
        assert a[rel][0] == kind and a[rel][2] == content, rel
        if kind == "file":
            assert a[rel][1] == (mode & 0o755) | 0o600, rel
    assert stats.files == sum(1 for k, _, _ in b.values() if k == "file")
