"""Tarballs behind a URL (http://, https://, s3://, gs://), streamed into the extractor through fsspec.

Why it works this way:
- The bytes go from the connection straight into the extractor, which reads a forward-only
  stream: no copy on disk, bounded memory. zip alone needs random access (its index is at the
  end): it is downloaded once into a file beside the entry, hashed as it is written, unpacked from
  that file and removed; never read again with ranges, whose bytes nobody would have hashed.
- An entry's name must be known before extracting (conda-unpack writes the prefix it finds itself
  at), but a download cannot be hashed before it is read. So the key is the pin
  (MLSERVER_ENV_TARBALL_SHA256) when there is one, which also lets a warm start skip the network;
  otherwise it is derived from what the server says about the object without sending it (ETag,
  Last-Modified, generation and size, from one HEAD).
- The SHA-256 is computed while streaming and checked before anything is relocated, run or
  published.
- A transient failure (reset, timeout, 5xx) restarts the unpack in an empty entry after a backoff:
  resuming a decompressor mid-stream is not worth its complexity.
fsspec and its backends are imported here only, and only when a URL is configured.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib
import json
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar, cast
from urllib.parse import urlsplit

from entrypoint import log
from entrypoint.errors import ArchiveError, ConfigError, EntrypointError

if TYPE_CHECKING:
    from entrypoint.archive import Member
    from entrypoint.cache import Entry
    from entrypoint.extract import Stats
    from entrypoint.settings import Settings

T = TypeVar("T")

# scheme -> (fsspec protocol, the package that implements it)
SCHEMES = {"http": ("http", "aiohttp"), "https": ("https", "aiohttp"), "s3": ("s3", "s3fs"), "gs": ("gs", "gcsfs")}
CHUNK = 1 << 20
BLOCK = 8 << 20  # range-request size for object stores: bounds what is buffered
# What identifies one version of an object, as fs.info reports it (http, s3, gcs spellings).
VALIDATORS = ("ETag", "etag", "Last-Modified", "LastModified", "generation", "updated", "VersionId")
TRANSIENT_STATUS = {408, 425, 429}  # and every 5xx
BACKOFF_BASE, BACKOFF_MAX = 0.5, 30.0
ZIP_MEMBER_OVERHEAD = 1024  # a zip's bytes besides the data, per member: two headers, the name twice, generously
MAX_IDLE = 64 << 20  # bytes a download may take to give no tar at all: as archive.MAX_TRAILER bounds the padding

_infos: dict[str, dict[str, Any]] = {}  # url -> fs.info, so the cold path does not ask twice


@dataclass(frozen=True)
class RemoteTarball:
    url: str
    retries: int
    timeout: float

    @property
    def scheme(self) -> str:
        return urlsplit(self.url).scheme.lower()

    @property
    def display(self) -> str:
        """The URL without password or query: a presigned URL's signature stays out of logs."""
        return _redact(self.url)


def _redact(url: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]  # no user:password
    return f"{parts.scheme}://{host}{parts.path}" + ("?…" if parts.query else "")


def locate(url: str, settings: Settings) -> RemoteTarball:
    """Check the URL's form only: a pinned warm start needs no network and no fsspec."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises for a port out of range or not a number
    except ValueError as exc:  # not shown: what it holds cannot be told from a password or a signature
        raise ConfigError(f"MLSERVER_ENV_TARBALL is not a valid URL ({exc}); check it") from None
    tarball = RemoteTarball(url, settings.remote_retries, settings.remote_timeout)
    if tarball.scheme in ("http", "https") and any(c.isspace() or ord(c) < 0x20 or c == "\x7f" for c in url):
        raise ConfigError(  # sent as written (presigned signatures): a server would see another URL, or none
            f"MLSERVER_ENV_TARBALL={tarball.display!r}: the URL holds a space or a control character, which a URL "
            "may not; percent-encode it (a space as %20)"
        )
    if tarball.scheme not in SCHEMES:
        raise ConfigError(
            f"MLSERVER_ENV_TARBALL={tarball.display}: unsupported URL scheme {tarball.scheme}://; use "
            "http://, https://, s3:// or gs://, or a local path"
        )
    if not parts.netloc or parts.path.strip("/") == "":
        raise ConfigError(f"MLSERVER_ENV_TARBALL={tarball.display}: the URL names no file; give its full path")
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
            f"{tarball.display}: the server reports neither ETag nor Last-Modified, so a changed tarball "
            "could not be told from the cached one; set MLSERVER_ENV_TARBALL_SHA256 to its SHA-256"
        )
    parts = urlsplit(tarball.url)  # no query: a presigned URL's signature changes, the object does not
    host = parts.netloc.rpartition("@")[2].lower()
    identity.update(url=f"{parts.scheme.lower()}://{host}{parts.path}", size=str(info.get("size")))
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest(), True


def extract(tarball: RemoteTarball, entry: Entry, settings: Settings) -> Stats:
    """Stream the URL into the new entry.prefix and check the pin; what a transient failure left
    is discarded and the download starts over. Returns once the digest is known to be right."""
    from entrypoint import cache

    info = _info(tarball)
    return _retrying(
        tarball, "download", lambda: _extract_once(tarball, info, entry, settings), lambda: cache.discard(entry)
    )


def _extract_once(tarball: RemoteTarball, info: dict[str, Any], entry: Entry, settings: Settings) -> Stats:
    from entrypoint import archive
    from entrypoint import extract as extractor

    fs, path = _filesystem(tarball)
    size = info.get("size")
    limits = extractor.Limits(settings.max_members, settings.max_unpacked_bytes)
    spool: Path | None = None
    local: BinaryIO | None = None
    try:
        with _open(tarball, lambda: _open_stream(tarball, fs, path, info)) as f:
            _check_same_object(tarball, f, info)
            reader = _Reader(f, tarball, size)
            os.mkdir(entry.prefix, 0o755)
            head = reader.read(512)
            stream = cast(BinaryIO, archive.Replay(head, cast(BinaryIO, reader)))
            if _format(tarball, head) == "zip":
                spool, local = _spool_zip(tarball, reader, head, entry, settings)
            else:
                reader.produced()  # from here, bytes that give no tar are bounded
                progress = log.Progress("extract", size, reader.tell) if size else None
                try:
                    stats = extractor.extract(  # written back meanwhile by prepare's cache.BackgroundSync
                        _ticking(archive.members(stream, reader.produced), progress),
                        entry.prefix,
                        limits,
                    )
                except archive.CORRUPT as exc:
                    raise archive.corrupt(exc, tarball.display) from None
                finally:
                    if progress is not None:
                        progress.done()  # also before an error line, which would follow the drawn one
                # The bytes after the end-of-archive marker count too.
                _check_pin(tarball, reader.finish(), settings.tarball_sha256, reader.pos)
                return stats
        # The connection is closed: the zip is read from the very file (descriptor) its digest was
        # computed from as it was written, not reopened by its name.
        assert local is not None
        local.seek(0)
        try:
            held = -(-os.fstat(local.fileno()).st_size // extractor.DISK_BLOCK) * extractor.DISK_BLOCK
            return extractor.extract(archive.members(local), entry.prefix, limits, held)
        except archive.CORRUPT as exc:
            raise archive.corrupt(exc, tarball.display) from None
    finally:
        if local is not None:
            local.close()
        if spool is not None:
            with contextlib.suppress(FileNotFoundError):
                spool.unlink()


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
                f"{tarball.display}: the server sent an HTML page, not a tarball (a login, error or index page?); "
                "check the URL and the credentials (a presigned URL may have expired)"
            ) from None
        raise ArchiveError(f"{tarball.display}: {exc}; check that the URL names the tarball") from None


def _spool_zip(
    tarball: RemoteTarball, reader: _Reader, head: bytes, entry: Entry, settings: Settings
) -> tuple[Path, BinaryIO]:
    """A zip needs random access (its index is at its end): the one download goes to a file beside
    the entry, hashed as it is written, and the pin is checked before anything is unpacked. Reading
    it again with ranges would unpack bytes nobody hashed (a server may answer Range requests with
    another object), or mix two versions of one replaced meanwhile.

    Named `.<key8>.download.<pid>.tmp`: what cache.discard removes with the entry, so a retry, a
    stop or a kill -9 leaves nothing the next start (or gc) does not remove."""
    from entrypoint import extract as extractor

    spool = entry.root / f".{entry.name}.download.{os.getpid()}.tmp"
    # Bounded by what it may unpack to, announced or not: a server must not fill the shared cache.
    bound = settings.max_unpacked_bytes + settings.max_members * ZIP_MEMBER_OVERHEAD + MAX_IDLE
    too_big = ArchiveError(
        f"{tarball.display}: the zip download is over {bound} bytes, more than it may unpack to; raise "
        "MLSERVER_ENV_MAX_UNPACKED_BYTES if this environment is really that large, or check the server"
    )
    if reader.size is not None and reader.size > bound:
        raise too_big
    out: BinaryIO | None = None
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
        _check_pin(tarball, reader.finish(), settings.tarball_sha256, reader.pos)
        return spool, out
    except BaseException as exc:  # a stop signal's too: no spool outlives its attempt
        if out is not None:
            out.close()
        with contextlib.suppress(OSError):
            spool.unlink()
        if not isinstance(exc, OSError):
            raise
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _no_space_for_zip(entry, reader.pos, reader.size) from None
        raise extractor.write_error(exc, entry.prefix) from None


def _no_space_for_zip(entry: Entry, got: int, size: int | None) -> ConfigError:
    st = os.statvfs(entry.root)
    needed = f"{-(-size // 1_000_000)} MB" if size else f"more than {got // 1_000_000} MB"
    return ConfigError(
        f"no space left in cache directory {entry.root} (MLSERVER_ENV_CACHE_DIR) for the downloaded zip: it needs "
        f"{needed} there while it is unpacked, besides the environment, and {st.f_bavail * st.f_frsize / 1e6:.0f} MB "
        "are free; free space, point MLSERVER_ENV_CACHE_DIR at a bigger volume, or serve a .tar.gz (streamed, "
        "nothing but the environment written)"
    )


def _ticking(members: Iterator[Member], progress: log.Progress | None) -> Iterator[Member]:
    for m in members:
        if progress is not None:
            progress.tick()
        yield m


def _check_pin(tarball: RemoteTarball, digest: str, pin: str | None, size: int) -> None:
    if pin is not None and digest != pin:
        raise ConfigError(
            f"{tarball.display}: SHA-256 of the download is {digest}, but MLSERVER_ENV_TARBALL_SHA256 pins "
            f"{pin}; nothing was published; use the pinned tarball or update the pin"
        )
    how = "matches MLSERVER_ENV_TARBALL_SHA256" if pin else "set MLSERVER_ENV_TARBALL_SHA256 to it to pin this tarball"
    log.info(f"downloaded {size / 1e6:.0f} MB, SHA-256 {digest} ({how})")


# --- fsspec -------------------------------------------------------------------------------------


def _filesystem(tarball: RemoteTarball) -> tuple[Any, str]:
    """The fsspec filesystem for the URL (instances are cached by fsspec) and the path in it."""
    protocol, package = SCHEMES[tarball.scheme]
    try:
        import fsspec
        import fsspec.config

        importlib.import_module(package)
    except ImportError as exc:
        raise ConfigError(
            f"{tarball.display}: reading {tarball.scheme}:// URLs needs the Python package {exc.name or package}; "
            "install the entrypoint's `remote` extra where it runs (the image has http(s) only: README, Docker), "
            "or give a local file"
        ) from None
    names = ("http", "https") if package == "aiohttp" else (protocol,)
    user = {k: v for name in names for k, v in fsspec.config.conf.get(name, {}).items()}  # FSSPEC_*: they win
    options: dict[str, Any] = {}
    if package == "aiohttp":
        import aiohttp

        # aiohttp's default 5-minute total would cut a large download short; bound stalls instead.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=tarball.timeout, sock_read=tarball.timeout)
        # The object's own bytes, as `sha256sum` of the file sees them and the pin names them: a
        # .tar.gz stored with `Content-Encoding: gzip` (S3 metadata, Apache's AddEncoding) was
        # decoded into its tar, whose digest matched no pin; nor may a server compress on the fly.
        options["client_kwargs"] = {
            "timeout": timeout,
            "auto_decompress": False,
            "headers": {"Accept-Encoding": "identity"},
            **user.get("client_kwargs", {}),
        }
        options["encoded"] = True  # send the URL as written: re-encoding breaks presigned signatures
    elif package == "s3fs":
        timeouts = {"connect_timeout": tarball.timeout, "read_timeout": tarball.timeout}
        options["config_kwargs"] = {**timeouts, **user.get("config_kwargs", {})}
    elif package == "gcsfs":
        options["timeout"] = tarball.timeout
    fs = fsspec.filesystem(protocol, **options)
    return fs, fs._strip_protocol(tarball.url)


def _info(tarball: RemoteTarball) -> dict[str, Any]:
    """fs.info (a HEAD): size and validators, retried like a download."""
    if tarball.url not in _infos:
        fs, path = _filesystem(tarball)
        _infos[tarball.url] = _retrying(tarball, "HEAD", lambda: dict(_call(tarball, lambda: fs.info(path))))
    return _infos[tarball.url]


def _open_stream(tarball: RemoteTarball, fs: Any, path: str, info: dict[str, Any]) -> Any:
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
    """The GET must be of the object whose HEAD the key came from, or it would be published under
    that object's identity: s3fs pins its ranged reads to the ETag it saw at open; an http server
    may ignore If-Match, so its answer's ETag (when both say one) and length must be HEAD's."""
    details = getattr(f, "details", None)
    if isinstance(details, dict) and "ETag" in details and "ETag" in info and details["ETag"] != info["ETag"]:
        raise ConfigError(f"{tarball.display} changed while starting; start again")
    headers = getattr(getattr(f, "r", None), "headers", None)  # fsspec's HTTPStreamFile: the aiohttp response
    if headers is None:
        return
    etag, length, size = headers.get("ETag"), headers.get("Content-Length"), info.get("size")
    # A proxy may weaken the GET's ETag (W/"…") while the object is the same: the opaque part counts.
    if etag and info.get("ETag") and etag.removeprefix("W/") != str(info["ETag"]).removeprefix("W/"):
        changed = f"its ETag was {info['ETag']} on HEAD, {etag} on GET"
    elif length is not None and length.isdigit() and size is not None and int(length) != size:
        changed = f"its size was {size} bytes on HEAD, {length} on GET"
    else:
        return
    ignored = "".join(f"; the server ignored {header}" for header in _conditions(info))
    raise ConfigError(f"{tarball.display} changed while starting ({changed}{ignored}); start again")


class _open:
    """Open with the backend's errors turned into ours; close whatever happens."""

    def __init__(self, tarball: RemoteTarball, opener: Callable[[], Any]) -> None:
        self._f = _call(tarball, opener)

    def __enter__(self) -> Any:
        return self._f

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):  # a broken connection may fail to close: nothing to keep
            self._f.close()


class _Reader:
    """The download as the extractor reads it, forward only. Backend errors become `_Retry` or
    one-line errors (never an OSError, which the extractor would blame on the cache directory);
    every byte is hashed and counted, and a body cut short is noticed."""

    def __init__(self, f: Any, tarball: RemoteTarball, size: int | None) -> None:
        self._f = f
        self._tarball = tarball
        self.size = size
        self._sha = hashlib.sha256()
        self.pos = 0
        self._idle_from: int | None = None  # where the codec last gave output, once watched (`produced`)

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
        """The codec gave a chunk of tar (called in the thread that reads this). Valid compressed
        data never takes MAX_IDLE bytes to give one; zero padding after a gzip member, or endless
        empty members, give none at all, so they would never reach the extractor's own bound on
        what follows the end-of-archive marker: the bytes read since the last chunk are bounded."""
        self._idle_from = self.pos

    def _check_bounds(self) -> None:
        if self.size is not None and self.pos > self.size:
            raise ArchiveError(
                f"{self._tarball.display}: the server sent more than the {self.size} bytes it announced (a server "
                "fault); check that it serves the object alone, or serve it from another server"
            )
        if self._idle_from is not None and self.pos - self._idle_from > MAX_IDLE:
            raise ArchiveError(
                f"{self._tarball.display}: more than {MAX_IDLE >> 20} MiB of the download gave no data (zero "
                "padding or empty compressed streams after the archive: corrupt or hostile, or a server that "
                "keeps sending); pack it again or check the server"
            )

    def finish(self) -> str:
        """Read what the extractor left (end-of-archive padding, the compressor's trailer); the digest."""
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
        raise _failure(exc, tarball) from None


def _retrying(
    tarball: RemoteTarball, what: str, attempt: Callable[[], T], cleanup: Callable[[], object] | None = None
) -> T:
    """Run `attempt`; after a `_Retry`, clean up, wait (exponential backoff with jitter) and run it again."""
    for n in range(tarball.retries + 1):
        try:
            return attempt()
        except _Retry as exc:
            if n == tarball.retries:
                times = "once" if n == 0 else f"{n + 1} times"
                raise EntrypointError(
                    f"{tarball.display}: {what} failed {times}, last with: {exc}; check the network and the server, "
                    "or raise MLSERVER_ENV_REMOTE_RETRIES"
                ) from None
            if cleanup is not None:
                cleanup()
            delay = min(BACKOFF_MAX, BACKOFF_BASE * 2**n) * random.uniform(1, 1.5)
            log.info(
                f"{what} of {tarball.display}: {exc}; retrying in {delay:.1f} s ({n + 2} of {tarball.retries + 1})"
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _status(exc: BaseException) -> int | None:
    """The HTTP status behind a backend's exception (aiohttp, botocore via s3fs, gcsfs)."""
    for e in _chain(exc):
        # aiohttp's ClientResponseError.status, gcsfs' HttpError.code (not aiohttp's parser errors'
        # `code`, a fixed 400 on a body cut short)
        value = getattr(e, "code" if type(e).__name__ == "HttpError" else "status", None)
        if isinstance(value, int) and 100 <= value < 600:
            return value
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


def _failure(exc: BaseException, tarball: RemoteTarball) -> Exception:
    """What a backend's exception means: `_Retry` if trying again may help, else a one-line error."""
    status = _status(exc)
    chain = list(_chain(exc))
    names = {type(e).__name__ for e in chain}
    where = f"MLSERVER_ENV_TARBALL={tarball.display}"
    detail = f"HTTP {status}" if status else ""
    message = _message(exc, tarball)
    if tarball.scheme not in ("http", "https") and message:  # object stores say which of bucket or key
        detail = f"{detail}: {message}" if detail else message
    # Before the status: aiohttp reports a response it could not parse as an HTTP 400 of its own.
    if "ClientPayloadError" not in names and (bad := next((e for e in chain if _is_parse_error(e)), None)):
        lines = str(getattr(bad, "message", "") or "").strip().splitlines()
        why = lines[0].rstrip(":") if lines else type(bad).__name__
        return ConfigError(f"{where}: the server sent an invalid HTTP response ({why[:200]}); check the server")
    redirect = next((e for e in chain if "UrlRedirectClientError" in type(e).__name__), None)
    if redirect is not None:  # aiohttp's NonHttpUrl… (file://, ftp://) and InvalidUrl… (a bad port)
        if "NonHttp" in type(redirect).__name__:
            scheme = urlsplit(str(redirect).partition(" ")[0]).scheme or "non-http"
            return ConfigError(
                f"{where}: the server redirected to a {scheme}:// URL, which is not followed (only http:// and "
                "https:// are); check the URL, or give the one it redirects to"
            )
        cause = _message(chain[-1], tarball) if chain[-1] is not redirect else ""
        return ConfigError(f"{where}: the server redirected to an invalid URL ({cause or 'unparsable'}); check the URL")
    if status == 412 or "FileExpired" in names:
        return ConfigError(f"{tarball.display} changed while it was being downloaded; start again")
    if status is not None and (status >= 500 or status in TRANSIENT_STATUS):
        return _Retry(detail)
    # Named by the transient error itself: fsspec's info wraps a refused connection in a
    # FileNotFoundError whose text is the URL, which said neither what failed nor why.
    transient = next((e for e in chain if isinstance(e, _transient_types())), None)
    if status is None and transient is not None:
        text = _message(transient, tarball)
        return _Retry(f"{type(transient).__name__}: {text}" if text else type(transient).__name__)
    if "TooManyRedirects" in names:
        return ConfigError(f"{where}: too many redirects (a redirect loop?); check the URL")
    if "NoCredentialsError" in names or "DefaultCredentialsError" in names:
        return ConfigError(f"{where}: no credentials found; {_credentials_hint(tarball)}")
    forbidden = any(isinstance(e, PermissionError) or str(e).startswith("Forbidden") for e in chain)  # gcsfs: OSError
    if status in (401, 403) or forbidden:
        return ConfigError(f"{where}: access denied ({detail or 'permission error'}); {_credentials_hint(tarball)}")
    if status in (404, 410) or (status is None and any(isinstance(e, FileNotFoundError) for e in chain)):
        what = "check the URL" if tarball.scheme in ("http", "https") else "check the bucket and key"
        return ConfigError(f"{where}: not found ({detail or 'no such object'}); {what}")
    return ConfigError(f"{where}: cannot read it ({detail or message or type(exc).__name__})")


def _is_parse_error(exc: BaseException) -> bool:
    """aiohttp's HttpProcessingError (a header it cannot parse, such as `Content-Length: abc`)."""
    return any(c.__name__ == "HttpProcessingError" for c in type(exc).__mro__)


def _message(exc: BaseException, tarball: RemoteTarball) -> str:
    """The exception's first line, without the URL (it may carry a signature)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return "" if tarball.url in text or text in (tarball.url, _redact(tarball.url)) else text[:200]


def _credentials_hint(tarball: RemoteTarball) -> str:
    if tarball.scheme == "s3":
        return (
            "check the credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or the pod's IAM "
            "role) and the bucket policy; FSSPEC_S3_ANON=true reads a public bucket"
        )
    if tarball.scheme == "gs":
        return "check the credentials (GOOGLE_APPLICATION_CREDENTIALS or the workload identity) and the bucket's IAM"
    return "check the URL (a presigned URL may have expired) and that this server lets the container read it"
