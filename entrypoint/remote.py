"""Tarballs behind a URL (http://, https://, s3://, gs://), streamed into the extractor through fsspec.

- The bytes go from the connection straight into the extractor, which reads a forward-only
  stream: no copy on disk, bounded memory. A zip needs random access (its index is at its end):
  it is downloaded once beside the entry, hashed as it is written, unpacked from that very file
  and removed; never read again with ranges, whose bytes nobody would have hashed.
- An entry's name must be known before extracting (conda-unpack writes the prefix it finds), but
  a download cannot be hashed before it is read: the key is the pin (MLSERVER_ENV_TARBALL_SHA256),
  which also lets a warm start skip the network, or else derived from what one HEAD says of the
  object (ETag, Last-Modified, generation, size). The SHA-256 is computed while streaming and
  checked before anything is relocated, run or published.
- A transient failure (reset, timeout, 5xx) starts the unpack again in an empty entry after a
  backoff: resuming a decoder mid-stream is not worth its complexity.
fsspec and its backends are imported only here, and only when a URL is configured.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib
import json
import logging
import os
import random
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, NamedTuple, TypeVar, cast
from urllib.parse import urlsplit

from entrypoint import log
from entrypoint.errors import ArchiveError, ConfigError, EntrypointError
from entrypoint.settings import URL_SCHEMES

if TYPE_CHECKING:
    from entrypoint.entry import Entry
    from entrypoint.extract import Limits, Stats
    from entrypoint.settings import Settings

T = TypeVar("T")

# scheme -> (fsspec protocol, the package that implements it)
SCHEMES = {"http": ("http", "aiohttp"), "https": ("https", "aiohttp"), "s3": ("s3", "s3fs"), "gs": ("gs", "gcsfs")}
assert tuple(SCHEMES) == URL_SCHEMES  # the warm path's list
CHUNK = 1 << 20
BLOCK = 8 << 20  # range-request size for object stores: bounds what is buffered
# What identifies one version of an object, as fs.info reports it (http, s3, gcs spellings).
VALIDATORS = ("ETag", "etag", "Last-Modified", "LastModified", "generation", "updated", "VersionId")
TRANSIENT_STATUS = {408, 425, 429}  # and every 5xx
BACKOFF_BASE, BACKOFF_MAX = 0.5, 30.0
ZIP_MEMBER_OVERHEAD = 1024  # a zip's bytes besides the data, per member: two headers, the name twice, generously
MAX_IDLE = 64 << 20  # bytes a download may take to give no tar at all (as tarstream.MAX_TRAILER bounds padding)

_infos: dict[str, dict[str, Any]] = {}  # url -> fs.info, so the cold path does not ask twice

# The backends' log records are not ours to print (gcsfs logs a traceback for each refused
# request, and Python prints them when no handler is set): the error line says what failed, and
# MLSERVER_ENV_DEBUG shows the traceback behind it.
for _package in sorted({package for _, package in SCHEMES.values()}):
    logging.getLogger(_package).addHandler(logging.NullHandler())


class RemoteTarball(NamedTuple):
    url: str
    retries: int
    timeout: float

    @property
    def scheme(self) -> str:
        return urlsplit(self.url).scheme.lower()

    @property
    def display(self) -> str:
        """The URL without password or query: a presigned URL's signature stays out of logs."""
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}" + ("?…" if parts.query else "")


def locate(url: str, config: Settings) -> RemoteTarball:
    """Check the URL's form only: a pinned warm start needs no network and no fsspec."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises for a port out of range or not a number
    except ValueError as exc:  # not shown: a password or a signature may be in it
        raise ConfigError(f"MLSERVER_ENV_TARBALL is not a valid URL ({exc})", "check it") from exc
    tarball = RemoteTarball(url, config.remote_retries, config.remote_timeout)
    named = f"MLSERVER_ENV_TARBALL={tarball.display}"
    if tarball.scheme in ("http", "https") and any(c.isspace() or ord(c) < 0x20 or c == "\x7f" for c in url):
        raise ConfigError(  # sent as written (presigned signatures): a server would see another URL, or none
            f"MLSERVER_ENV_TARBALL={tarball.display!r}: the URL holds a space or a control character, which a URL "
            "may not",
            "percent-encode it (a space as %20)",
        )
    if tarball.scheme not in SCHEMES:
        raise ConfigError(
            f"{named}: unsupported URL scheme {tarball.scheme}://",
            "use http://, https://, s3:// or gs://, or a local path",
        )
    if not parts.netloc or parts.path.strip("/") == "":
        raise ConfigError(f"{named}: the URL names no file", "give its full path")
    return tarball


def content_key(tarball: RemoteTarball, pin: str | None) -> tuple[str, bool]:
    """The entry key for a URL: the pin, else a hash of the object's identity (no body is read);
    True, like a remembered local key: nothing was hashed."""
    if pin is not None:
        return pin, True
    info = _info(tarball)
    identity = {k: str(info[k]) for k in VALIDATORS if info.get(k) not in (None, "")}
    if not identity:
        raise ConfigError(
            f"{tarball.display}: the server reports neither ETag nor Last-Modified, so a changed tarball could not "
            "be told from the cached one",
            "set MLSERVER_ENV_TARBALL_SHA256 to its SHA-256",
        )
    parts = urlsplit(tarball.url)  # no query: a presigned URL's signature changes, the object does not
    host = parts.netloc.rpartition("@")[2].lower()
    identity.update(url=f"{parts.scheme.lower()}://{host}{parts.path}", size=str(info.get("size")))
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest(), True


def extract(tarball: RemoteTarball, entry: Entry, config: Settings, limits: Limits) -> Stats:
    """Stream the URL into the new entry.prefix and check the pin; after a transient failure the
    partial entry is removed and the download starts over."""
    from entrypoint import entry as entries

    info = _info(tarball)
    return _retrying(
        tarball, "download", lambda: _extract_once(tarball, info, entry, config, limits), lambda: entries.discard(entry)
    )


def _extract_once(
    tarball: RemoteTarball, info: dict[str, Any], entry: Entry, config: Settings, limits: Limits
) -> Stats:
    from entrypoint import archive

    with _open(tarball, lambda: _open_stream(tarball, info)) as f:
        _check_same_object(tarball, f, info)
        reader = _Reader(f, tarball, info.get("size"))
        os.mkdir(entry.prefix, 0o755)
        head = reader.read(512)
        if _format(tarball, head) != "zip":
            return _stream(tarball, reader, archive.Replay(head, cast(BinaryIO, reader)), entry, config, limits)
        spool, local = _spool_zip(tarball, reader, head, entry, config)
    try:  # the connection is closed: unpacked from the very file its digest was computed on
        return _unpack_zip(tarball, local, entry, limits)
    finally:
        local.close()
        with contextlib.suppress(FileNotFoundError):
            spool.unlink()


def _stream(
    tarball: RemoteTarball, reader: _Reader, stream: object, entry: Entry, config: Settings, limits: Limits
) -> Stats:
    from entrypoint import archive, extract

    reader.produced()  # from here, bytes that give no tar are bounded
    try:
        with log.Progress("extract", reader.size or 0, reader.tell) as progress:
            members = archive.members(cast(BinaryIO, stream), reader.produced)
            stats = extract.extract(progress.through(members), entry.prefix, limits)
    except ArchiveError as exc:
        raise exc.about(tarball.display) from exc
    _check_pin(tarball, reader.finish(), config.tarball_sha256, reader.pos)  # the bytes after the archive count too
    return stats


def _unpack_zip(tarball: RemoteTarball, local: BinaryIO, entry: Entry, limits: Limits) -> Stats:
    from entrypoint import archive, extract

    local.seek(0)
    held = -(-os.fstat(local.fileno()).st_size // extract.DISK_BLOCK) * extract.DISK_BLOCK
    try:
        return extract.extract(archive.members(local), entry.prefix, limits, held)
    except ArchiveError as exc:
        raise exc.about(tarball.display) from exc


def _format(tarball: RemoteTarball, head: bytes) -> str:
    """The archive's format; a web page in its place (a login or error page answered with 200) is
    a URL or credentials to fix, not an archive to pack again."""
    from entrypoint import archive

    try:
        return archive.detect_format(head)
    except ArchiveError as exc:
        start = head.lstrip()[:512].lower()
        if start.startswith((b"<!doctype html", b"<html", b"<head", b"<!--")) or b"<html" in start:
            raise ConfigError(
                f"{tarball.display}: the server sent an HTML page, not a tarball (a login, error or index page?)",
                "check the URL and the credentials (a presigned URL may have expired)",
            ) from exc
        raise ArchiveError(f"{tarball.display}: {exc.message}", "check that the URL names the tarball") from exc


def _spool_zip(
    tarball: RemoteTarball, reader: _Reader, head: bytes, entry: Entry, config: Settings
) -> tuple[Path, BinaryIO]:
    """Download a zip into `.<key8>.download.<pid>.tmp` beside the entry (what entry.discard removes
    with it), hashed as it is written; the pin is checked before anything is unpacked. Bounded by
    what it may unpack to, announced or not: a server must not fill the shared cache."""
    from entrypoint import extract

    spool = entry.root / f".{entry.name}.download.{os.getpid()}.tmp"
    bound = config.max_unpacked_bytes + config.max_members * ZIP_MEMBER_OVERHEAD + MAX_IDLE
    too_big = ArchiveError(
        f"{tarball.display}: the zip download is over {bound} bytes, more than it may unpack to",
        "raise MLSERVER_ENV_MAX_UNPACKED_BYTES if this environment is really that large, or check the server",
    )
    if reader.size is not None and reader.size > bound:
        raise too_big
    out = None
    try:
        fd = os.open(spool, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        out = cast(BinaryIO, open(fd, "w+b", buffering=0))  # noqa: SIM115 - returned open, closed by the caller
        data = head
        while data:
            view = memoryview(data)
            while view:  # a short write (rare): write the rest
                view = view[out.write(view) or 0 :]
            data = reader.read(CHUNK)
            if reader.pos > bound:
                raise too_big
        _check_pin(tarball, reader.finish(), config.tarball_sha256, reader.pos)
        return spool, out
    except BaseException as exc:
        if out is not None:
            out.close()
        with contextlib.suppress(OSError):
            spool.unlink()
        if not isinstance(exc, OSError):
            raise
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _no_space_for_zip(entry, reader.pos, reader.size) from exc
        raise extract.write_error(exc, entry.prefix) from exc


def _no_space_for_zip(entry: Entry, got: int, size: int | None) -> ConfigError:
    st = os.statvfs(entry.root)
    needed = f"{-(-size // 1_000_000)} MB" if size else f"more than {got // 1_000_000} MB"
    return ConfigError(
        f"no space left in cache directory {entry.root} (MLSERVER_ENV_CACHE_DIR) for the downloaded zip: it needs "
        f"{needed} there while it is unpacked, besides the environment, and {st.f_bavail * st.f_frsize / 1e6:.0f} MB "
        "are free",
        "free space, point MLSERVER_ENV_CACHE_DIR at a bigger volume, or serve a .tar.gz (streamed, nothing but the "
        "environment written)",
    )


def _check_pin(tarball: RemoteTarball, digest: str, pin: str | None, size: int) -> None:
    if pin is not None and digest != pin:
        raise ConfigError(
            f"{tarball.display}: SHA-256 of the download is {digest}, but MLSERVER_ENV_TARBALL_SHA256 pins {pin}; "
            "nothing was published",
            "use the pinned tarball or update the pin",
        )
    how = "matches MLSERVER_ENV_TARBALL_SHA256" if pin else "set MLSERVER_ENV_TARBALL_SHA256 to it to pin this tarball"
    log.info(f"downloaded {size / 1e6:.0f} MB, SHA-256 {digest} ({how})")


# --- fsspec -------------------------------------------------------------------------------------


def _filesystem(tarball: RemoteTarball) -> tuple[Any, str]:
    """The fsspec filesystem for the URL (fsspec caches instances) and the path in it."""
    protocol, package = SCHEMES[tarball.scheme]
    try:
        import fsspec
        import fsspec.config

        importlib.import_module(package)
    except ImportError as exc:
        raise ConfigError(
            f"{tarball.display}: reading {tarball.scheme}:// URLs needs the Python package {exc.name or package}",
            "install the entrypoint's `remote` extra where it runs (the image has http(s) only: docs/deployment.md), "
            "or give a local file",
        ) from exc
    names = ("http", "https") if package == "aiohttp" else (protocol,)
    user = {k: v for name in names for k, v in fsspec.config.conf.get(name, {}).items()}  # FSSPEC_*: they win
    options = _options(tarball, package, user)
    if package == "gcsfs" and _gcs_emulator():
        # gcsfs >= 2026.3's default class asks each bucket's layout over gRPC (the Storage Control
        # API), which no emulator serves: every call would retry it for a minute. The JSON API
        # class reads the same objects.
        fs = importlib.import_module("gcsfs.core").GCSFileSystem(**options)
    else:
        fs = fsspec.filesystem(protocol, **options)
    return fs, fs._strip_protocol(tarball.url)


def _gcs_emulator() -> bool:
    """STORAGE_EMULATOR_HOST names a GCS emulator, as gcsfs and Google's libraries read it."""
    return os.environ.get("STORAGE_EMULATOR_HOST", "") not in ("", "default")


def _options(tarball: RemoteTarball, package: str, user: dict[str, Any]) -> dict[str, Any]:
    if package == "s3fs":
        return {"config_kwargs": {"connect_timeout": tarball.timeout, "read_timeout": tarball.timeout,
                                  **user.get("config_kwargs", {})}}  # fmt: skip
    import aiohttp

    if package == "gcsfs":
        # gcsfs sends each request with `requests_timeout` (none by default: a stall would hang);
        # its `timeout` bounds only uploads and bucket listings.
        stall = aiohttp.ClientTimeout(total=None, sock_connect=tarball.timeout, sock_read=tarball.timeout)
        # An emulator has no IAM: as Google's libraries do, send it no credentials of this machine's.
        anon = {"token": "anon"} if _gcs_emulator() else {}
        return {"requests_timeout": stall, **anon, **user}

    # Stalls bounded, not the total (a large download takes long). The object's own bytes, as the
    # pin names them: no decoding of a `Content-Encoding: gzip` tarball, no compression on the fly.
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=tarball.timeout, sock_read=tarball.timeout)
    client = {"timeout": timeout, "auto_decompress": False, "headers": {"Accept-Encoding": "identity"}}
    # `encoded`: the URL is sent as written, since re-encoding breaks presigned signatures.
    return {"client_kwargs": {**client, **user.get("client_kwargs", {})}, "encoded": True}


def _info(tarball: RemoteTarball) -> dict[str, Any]:
    """fs.info (a HEAD): size and validators, retried like a download."""
    if tarball.url not in _infos:
        fs, path = _filesystem(tarball)
        _infos[tarball.url] = _retrying(tarball, "HEAD", lambda: dict(_call(tarball, lambda: fs.info(path))))
    return _infos[tarball.url]


def _open_stream(tarball: RemoteTarball, info: dict[str, Any]) -> Any:
    fs, path = _filesystem(tarball)
    if tarball.scheme in ("http", "https"):  # one GET, read as it arrives
        return fs.open(path, "rb", block_size=0, size=info.get("size"), headers=_conditions(info))
    # Ranged GETs of BLOCK bytes, the next one fetched while this one is read; two blocks kept at most.
    return fs.open(path, "rb", block_size=BLOCK, cache_type="background", cache_options={"maxblocks": 2})


def _conditions(info: dict[str, Any]) -> dict[str, str]:
    """Make the GET fail (412) if the object changed since the HEAD the key was derived from."""
    etag = info.get("ETag")
    if isinstance(etag, str) and etag and not etag.startswith("W/"):  # weak ETags never match If-Match
        return {"If-Match": etag}
    if info.get("Last-Modified"):
        return {"If-Unmodified-Since": str(info["Last-Modified"])}
    return {}


def _check_same_object(tarball: RemoteTarball, f: Any, info: dict[str, Any]) -> None:
    """The GET must be of the object whose HEAD gave the key: s3fs pins its ranged reads to the
    ETag it saw at open; an http server may ignore If-Match, so its answer's ETag (when both say
    one; a proxy may mark it weak) and length must be HEAD's."""
    details = getattr(f, "details", None)
    if isinstance(details, dict) and "ETag" in details and "ETag" in info and details["ETag"] != info["ETag"]:
        raise ConfigError(f"{tarball.display} changed while starting", "start again")
    headers = getattr(getattr(f, "r", None), "headers", None)  # fsspec's HTTPStreamFile: the aiohttp response
    if headers is None:
        return
    etag, length, size = headers.get("ETag"), headers.get("Content-Length"), info.get("size")
    if etag and info.get("ETag") and etag.removeprefix("W/") != str(info["ETag"]).removeprefix("W/"):
        changed = f"its ETag was {info['ETag']} on HEAD, {etag} on GET"
    elif length is not None and length.isdigit() and size is not None and int(length) != size:
        changed = f"its size was {size} bytes on HEAD, {length} on GET"
    else:
        return
    ignored = "".join(f"; the server ignored {header}" for header in _conditions(info))
    raise ConfigError(f"{tarball.display} changed while starting ({changed}{ignored})", "start again")


@contextlib.contextmanager
def _open(tarball: RemoteTarball, opener: Callable[[], Any]) -> Iterator[Any]:
    """Open with the backend's errors turned into ours; close whatever happens (a broken
    connection may fail to close: nothing is kept from it)."""
    f = _call(tarball, opener)
    try:
        yield f
    finally:
        with contextlib.suppress(Exception):
            f.close()


class _Reader:
    """The download as the extractor reads it, forward only: backend errors become `_Retry` or
    one-line errors (never an OSError, which would be blamed on the cache); every byte is hashed
    and counted, and a body cut short is noticed."""

    def __init__(self, f: Any, tarball: RemoteTarball, size: int | None) -> None:
        self._f = f
        self._tarball = tarball
        self.size = size
        self._sha = hashlib.sha256()
        self.pos = 0
        self._idle_from: int | None = None  # where the decoder last gave output, once watched (`produced`)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        parts = []
        while n != 0:
            data = self._read_some(CHUNK if n < 0 else min(n, CHUNK))
            if not data:
                if self.size is not None and self.pos < self.size:
                    raise _Retry(f"the transfer ended after {self.pos} of {self.size} bytes")
                break
            self._sha.update(data)
            self.pos += len(data)
            self._check_bounds()
            parts.append(data)
            if n > 0:
                n -= len(data)
        return b"".join(parts)

    def _read_some(self, n: int) -> bytes:
        return bytes(_call(self._tarball, lambda: self._f.read(n)))

    def produced(self) -> None:
        """The decoder gave a chunk of tar (called in the thread reading this). Zero padding after a
        gzip member, or endless empty members, give none at all: the bytes since are bounded."""
        self._idle_from = self.pos

    def _check_bounds(self) -> None:
        if self.size is not None and self.pos > self.size:
            raise ArchiveError(
                f"{self._tarball.display}: the server sent more than the {self.size} bytes it announced (a server "
                "fault)",
                "check that it serves the object alone, or serve it from another server",
            )
        if self._idle_from is not None and self.pos - self._idle_from > MAX_IDLE:
            raise ArchiveError(
                f"{self._tarball.display}: more than {MAX_IDLE >> 20} MiB of the download gave no data (zero "
                "padding or empty compressed streams after the archive: corrupt or hostile, or a server that "
                "keeps sending)",
                "pack it again or check the server",
            )

    def finish(self) -> str:
        """Read what the extractor left (end-of-archive padding, the decoder's trailer); the digest."""
        while self.read(CHUNK):
            pass
        return self._sha.hexdigest()


# --- errors and retries ---------------------------------------------------------------------------


class _Retry(Exception):
    """A failure that trying again may cure (reset, timeout, 5xx, a body cut short)."""


def _call(tarball: RemoteTarball, fn: Callable[[], T]) -> T:
    try:
        return fn()
    except (EntrypointError, _Retry):
        raise
    except Exception as exc:
        raise _failure(exc, tarball) from exc


def _retrying(
    tarball: RemoteTarball, what: str, attempt: Callable[[], T], cleanup: Callable[[], object] | None = None
) -> T:
    """Run `attempt`; after a `_Retry`, clean up, wait (exponential backoff with jitter), again."""
    for n in range(tarball.retries + 1):
        try:
            return attempt()
        except _Retry as exc:
            if n == tarball.retries:
                times = "once" if n == 0 else f"{n + 1} times"
                raise EntrypointError(
                    f"{tarball.display}: {what} failed {times}, last with: {exc}",
                    "check the network and the server, or raise MLSERVER_ENV_REMOTE_RETRIES",
                ) from exc
            if cleanup is not None:
                cleanup()
            delay = min(BACKOFF_MAX, BACKOFF_BASE * 2**n) * random.uniform(1, 1.5)
            log.info(
                f"{what} of {tarball.display}: {exc}; retrying in {delay:.1f} s ({n + 2} of {tarball.retries + 1})"
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and all(e is not s for s in seen):
        seen.append(e)
        e = e.__cause__ or e.__context__
    return seen


def _status(chain: list[BaseException]) -> int | None:
    """The HTTP status behind a backend's exception (aiohttp, botocore via s3fs, gcsfs)."""
    for e in chain:
        # aiohttp's ClientResponseError.status, gcsfs' HttpError.code (not aiohttp's parser errors'
        # `code`, a fixed 400 on a body cut short)
        value = getattr(e, "code" if type(e).__name__ == "HttpError" else "status", None)
        if isinstance(value, int) and 100 <= value < 600:
            return value
        if type(e) is OSError and str(e).startswith("Forbidden: "):  # gcsfs' 403
            return 403
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            value = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if isinstance(value, int):
                return value
    return None


def _transient_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, names in (
        ("aiohttp", ("ClientConnectionError", "ClientPayloadError")),
        ("fsspec.exceptions", ("FSTimeoutError",)),
        ("botocore.exceptions", ("ConnectionError", "HTTPClientError", "IncompleteReadError")),
        ("requests.exceptions", ("ConnectionError", "Timeout", "ChunkedEncodingError")),  # gcsfs' auth
    ):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        types += [getattr(mod, name) for name in names if isinstance(getattr(mod, name, None), type)]
    return tuple(types)


class _Failure(NamedTuple):
    """What is known of a backend's exception, for the classifiers below."""

    tarball: RemoteTarball
    chain: list[BaseException]
    names: set[str]
    status: int | None
    where: str  # MLSERVER_ENV_TARBALL=<url>
    detail: str  # "HTTP 403", and an object store's own words


def _failure(exc: BaseException, tarball: RemoteTarball) -> Exception:
    """What a backend's exception means: `_Retry` if trying again may help, else one line. The
    classifiers are tried in order; the first that recognises it says."""
    chain = _chain(exc)
    status = _status(chain)
    detail = f"HTTP {status}" if status else ""
    message = _message(exc, tarball)
    if tarball.scheme not in ("http", "https") and message:  # object stores say which of bucket or key
        detail = f"{detail}: {message}" if detail else message
    failure = _Failure(tarball, chain, {type(e).__name__ for e in chain}, status,
                       f"MLSERVER_ENV_TARBALL={tarball.display}", detail)  # fmt: skip
    for classify in CLASSIFIERS:
        if (outcome := classify(failure)) is not None:
            return outcome
    return ConfigError(f"{failure.where}: cannot read it ({detail or message or type(exc).__name__})")


def _invalid_response(f: _Failure) -> Exception | None:
    """aiohttp reports a response it cannot parse as an HTTP 400 of its own: seen before the status."""
    bad = next((e for e in f.chain if any(c.__name__ == "HttpProcessingError" for c in type(e).__mro__)), None)
    if bad is None or "ClientPayloadError" in f.names:
        return None
    lines = str(getattr(bad, "message", "") or "").strip().splitlines()
    why = lines[0].rstrip(":") if lines else type(bad).__name__
    return ConfigError(f"{f.where}: the server sent an invalid HTTP response ({why[:200]})", "check the server")


def _bad_redirect(f: _Failure) -> Exception | None:
    """aiohttp's NonHttpUrl… (file://, ftp://) and InvalidUrl… (a bad port) redirect errors."""
    redirect = next((e for e in f.chain if "UrlRedirectClientError" in type(e).__name__), None)
    if redirect is None:
        return None
    if "NonHttp" in type(redirect).__name__:
        scheme = urlsplit(str(redirect).partition(" ")[0]).scheme or "non-http"
        return ConfigError(
            f"{f.where}: the server redirected to a {scheme}:// URL, which is not followed (only http:// and "
            "https:// are)",
            "check the URL, or give the one it redirects to",
        )
    cause = _message(f.chain[-1], f.tarball) if f.chain[-1] is not redirect else ""
    return ConfigError(f"{f.where}: the server redirected to an invalid URL ({cause or 'unparsable'})", "check the URL")


def _changed(f: _Failure) -> Exception | None:
    if f.status == 412 or "FileExpired" in f.names:
        return ConfigError(f"{f.tarball.display} changed while it was being downloaded", "start again")
    return None


def _transient(f: _Failure) -> Exception | None:
    """5xx and throttling answers, and (with no status) a reset or a timeout, named by itself:
    fsspec wraps a refused connection in a FileNotFoundError whose text is just the URL."""
    if f.status is not None:
        return _Retry(f.detail) if f.status >= 500 or f.status in TRANSIENT_STATUS else None
    transient = next((e for e in f.chain if isinstance(e, _transient_types())), None)
    if transient is None:
        return None
    text = _message(transient, f.tarball)
    return _Retry(f"{type(transient).__name__}: {text}" if text else type(transient).__name__)


def _refused(f: _Failure) -> Exception | None:
    """Redirect loops, missing or refused credentials, and objects that are not there."""
    if "TooManyRedirects" in f.names:
        return ConfigError(f"{f.where}: too many redirects (a redirect loop?)", "check the URL")
    if "NoCredentialsError" in f.names or "DefaultCredentialsError" in f.names:
        return ConfigError(f"{f.where}: no credentials found", _credentials_hint(f.tarball))
    if f.status in (401, 403) or any(isinstance(e, PermissionError) for e in f.chain):
        return ConfigError(f"{f.where}: access denied ({f.detail or 'permission error'})", _credentials_hint(f.tarball))
    if f.status in (404, 410) or (f.status is None and any(isinstance(e, FileNotFoundError) for e in f.chain)):
        what = "check the URL" if f.tarball.scheme in ("http", "https") else "check the bucket and key"
        return ConfigError(f"{f.where}: not found ({f.detail or 'no such object'})", what)
    return None


CLASSIFIERS: tuple[Callable[[_Failure], Exception | None], ...] = (
    _invalid_response, _bad_redirect, _changed, _transient, _refused,
)  # fmt: skip


def _message(exc: BaseException, tarball: RemoteTarball) -> str:
    """The exception's first line, without the URL (it may carry a signature)."""
    text = str(exc).strip()
    if tarball.scheme == "gs":
        text = _gcs_words(exc, text, tarball)
    text = text.splitlines()[0] if text else ""
    return "" if tarball.url in text or text in (tarball.url, tarball.display) else text[:200]


GCS_BUCKET_PATH = re.compile(r"b/[^/]+(/o)?")  # the JSON API path of a bucket, or of its listing


def _gcs_words(exc: BaseException, text: str, tarball: RemoteTarball) -> str:
    """What GCS said, without gcsfs' wrapping: its 403 is "Forbidden: <API path>" above GCS'
    message, its HttpError's message ends in ", <code>", and its 404 names the API path it asked,
    not what is missing (a bucket's, when the bucket itself is)."""
    if type(exc) is OSError and text.startswith("Forbidden: "):
        return text.partition("\n")[2].strip() or "Forbidden"
    if type(exc).__name__ == "HttpError":
        return text.removesuffix(f", {getattr(exc, 'code', '')}")
    if isinstance(exc, FileNotFoundError):
        if GCS_BUCKET_PATH.fullmatch(text):
            return "The specified bucket does not exist"
        return f"No such object: {tarball.display.removeprefix('gs://')}"
    return text


def _credentials_hint(tarball: RemoteTarball) -> str:
    if tarball.scheme == "s3":
        return (
            "check the credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or the pod's IAM "
            "role) and the bucket policy; FSSPEC_S3_ANON=true reads a public bucket"
        )
    if tarball.scheme == "gs":
        return "check the credentials (GOOGLE_APPLICATION_CREDENTIALS or the workload identity) and the bucket's IAM"
    return "check the URL (a presigned URL may have expired) and that this server lets the container read it"
