"""The unpack benchmark (benchmarks/unpack.py) runs end to end and writes its table, plot and data.

Its smallest mode, on the small fixture: one round, one warm start, four methods. Nothing
here asserts a duration or a ratio: timings belong to the benchmark's own PASS/FAIL lines.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from support import REPO

SCRIPT = REPO / "benchmarks" / "unpack.py"
METHODS = ("decompress", "create", "durable", "mlserver11", "ours_cold")


def test_benchmark_runs_and_writes_table_plot_and_data(small_tarball: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    cmd = [sys.executable, str(SCRIPT), "--tarball", str(small_tarball), "--rounds", "1", "--warm-runs", "1"]
    cmd += ["--methods", ",".join(METHODS), "--no-change-check", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]

    table = (out / "unpack.md").read_text()
    for row in ("file creation only", "durable file creation", "tar -xzf + conda-unpack", "ours cold", "ours warm"):
        assert row in table, table
    verdicts = [line for line in proc.stdout.splitlines() if line.startswith(("PASS ", "FAIL "))]
    for target in ("÷ streaming limit", "÷ ours cold", "entrypoint work", "peak RSS"):
        assert any(target in line for line in verdicts), proc.stdout
    # the benchmark's own sanity checks on what the entrypoint produced (not timings)
    assert any("PASS" in line and "interpreter runs" in line for line in verdicts), proc.stdout
    assert any("PASS" in line and "same files" in line for line in verdicts), proc.stdout

    assert (out / "unpack.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "unpack.json").read_text())
    samples = data["datasets"][0]["samples"]
    assert set(METHODS) | {"ours_warm", "ours_warm_work"} <= set(samples), samples
    assert all(len(samples[m]) == 1 for m in METHODS if m != "create"), samples
    assert len(samples["create"]) == len(METHODS), samples  # measured before and after each method
    assert data["datasets"][0]["files"] > 1000  # counted from the extracted tree
    assert "streaming limit" in table and "CPU floor" in table and "peak RSS" in table
    # the entrypoint's own peak RSS was reported (not only its process tree's, conda-unpack included)
    assert data["datasets"][0]["entrypoint_rss_kib"], data["datasets"][0]
