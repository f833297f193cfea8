"""MkDocs hook: the performance page's tables and plot, generated from benchmarks/results/ (what
`make bench` wrote last), so the page shows that run's numbers and nothing else."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
MARKER = "<!-- benchmark results -->"
PLOT = "assets/unpack.png"
LABELS = {
    "decompress": "decoding only (the format's fastest decoder)",
    "create": "file creation only: `tar -xf` of the .tar",
    "durable": "durable file creation: `tar -xf` + `sync -f`",
    "mlserver11": "the format's tool + `conda-unpack` (MLServer 1.1's way)",
    "tarfile": "`tarfile.extractall` + `conda-unpack` (MLServer 1.7's way)",
    "tarfile_data": "same, `filter='data'`",
    "sha256": "SHA-256 of the tarball (MLServer 1.7, each load)",
    "ours_cold": "**ours, cold**: `mlserver-entrypoint unpack`",
    "ours_warm": "**ours, warm**: a cache hit, the whole process",
    "ours_warm_work": "**ours, warm**: the entrypoint's work before exec",
}


def on_files(files: Files, config: Any) -> Files:
    files.append(File.generated(config, PLOT, abs_src_path=str(RESULTS / "unpack.png")))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    if MARKER not in markdown:
        return markdown
    results = json.loads((RESULTS / "unpack.json").read_text())
    return markdown.replace(MARKER, "\n".join(_render(results)))


def _render(results: dict[str, Any]) -> list[str]:
    info = results["info"]
    commit = info["entrypoint"].split()[0]
    lines = [
        f"Measured {info['date']} on {info['host']}, entrypoint at commit `{commit}`, on {info['filesystem']}.",
        "",
    ]
    for ds in results["datasets"]:
        lines += _table(ds)
    return [*lines, f"![Unpack times of every method, per environment]({PLOT})"]


def _table(ds: dict[str, Any]) -> list[str]:
    head = (
        f"### {ds['name']}: {ds['format']}, {ds['tarball_bytes'] / 1e6:.0f} MB → {ds['bytes'] / 1e6:.0f} MB, "
        f"{ds['files']:,} files"
    )
    rows = [
        head,
        "",
        "| method | median | ÷ streaming limit | machine CPU | peak RSS |",
        "|---|---:|---:|---:|---:|",
    ]
    for method, samples in ds["samples"].items():
        ratio = ds["over_streaming"].get(method)
        shown = f"{ratio:.2f}×" if ratio else "–"
        cpu = ds["machine_cpu"].get(method)
        cpu_s = _seconds(statistics.median(cpu)) if cpu else "–"
        rss = ds.get("tree_rss_kib", {}).get(method)
        memory = f"{max(rss) / 1024:.0f} MiB" if rss else "–"
        name = f"decoding only: `{ds['decoder']}`" if method == "decompress" else LABELS.get(method, method)
        rows.append(f"| {name} | {_seconds(statistics.median(samples))} | {shown} | {cpu_s} | {memory} |")
    limit, floor = ds["streaming_limit"], ds["cpu_floor"]
    rows += [
        "",
        f"Streaming limit {_seconds(limit)}; CPU floor of a durable unpack {_seconds(floor)} ({floor / limit:.2f}×).",
    ]
    phases = [(k.removeprefix("ours: "), v) for k, v in ds.get("parts", {}).items() if k.startswith("ours: ")]
    if phases:
        rows += [
            "",
            "Ours, cold, by phase (medians): "
            + ", ".join(f"{k} {_seconds(statistics.median(v))}" for k, v in phases)
            + ".",
        ]
    return [*rows, ""]


def _seconds(value: float) -> str:
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"
