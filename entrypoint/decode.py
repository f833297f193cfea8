"""Decoders for compressed tars: gzip (isal), zstd, bzip2 (lbzip2, else libbz2) and xz, each read
as one byte stream.

A decoder's complaint about the bytes becomes the one archive error here and only here, so an
exception anywhere else is a bug, not "a corrupt archive".
"""

from __future__ import annotations

import bz2
import contextlib
import fcntl
import lzma
import os
import queue
import re
import shutil
import subprocess
import threading
from typing import IO, BinaryIO, cast

import zstandard
from isal import igzip, isal_zlib

from entrypoint import xzindex
from entrypoint.archive import CHUNK, PREFETCH_DEPTH, corrupt, drain
from entrypoint.errors import ArchiveError, ConfigError

# What an xz stream may make its decoder allocate: a 128 MiB dictionary (zstd's default window
# bound; xz -9 uses 64 MiB, conda-pack's default level 8 MiB) and its state.
XZ_MEMLIMIT = 136 << 20
# Threads decoding the streams of one xz file, at most: each holds its queue (4 MiB, a conda-pack
# stream's worth, so it can decode a whole stream ahead) and its decoder, and 2 keep the example's
# peak RSS at 44-58 MiB (4 took 75-81 MiB) for decoding 1.5 times as fast as 1.
XZ_THREADS = 2
BZIP2_END = 0x177245385090  # a bzip2 stream's end: this 48-bit magic, its CRC, bits to a whole byte
# A bzip2 stream's start: "BZh", its block size, then a block's magic, or the end's in an empty stream.
BZIP2_START = re.compile(rb"BZh[1-9](?:\x31\x41\x59\x26\x53\x59|\x17\x72\x45\x38\x50\x90)")
# lbzip2's threads: each reads about 10 MiB ahead of its output, which together must stay well under
# the bytes a download may take to give nothing (remote.MAX_IDLE, 64 MiB).
LBZIP2_THREADS = 4
# The codecs' errors on bad bytes: isal's gzip reader raises OSError without errno (BadGzipFile)
# and EOFError; bzip2 likewise.
CODEC_ERRORS = (EOFError, lzma.LZMAError, zstandard.ZstdError, cast("type[Exception]", isal_zlib.error))


def decoder(fmt: str, raw: BinaryIO) -> IO[bytes]:
    if fmt == "tar.gz":
        stream: object = igzip.IGzipFile(fileobj=raw, mode="rb")  # type: ignore[no-untyped-call]
    elif fmt == "tar.zst":
        stream = zstandard.ZstdDecompressor().stream_reader(raw, read_size=CHUNK, read_across_frames=True)
    elif fmt == "tar.bz2":
        stream = _bzip2(raw)
    else:
        stream = _xz(raw)
    return cast(IO[bytes], _Checked(cast(IO[bytes], stream)))


def _cores(at_most: int) -> int:
    """The threads a decoder may run: no more than the cores this process may use."""
    return min(at_most, len(os.sched_getaffinity(0)))


def _bzip2(raw: BinaryIO) -> object:
    """lbzip2 if it is installed and starts, else the in-process decoder."""
    if (tool := shutil.which("lbzip2")) is not None:
        with contextlib.suppress(OSError):  # it cannot be started (no memory, no process left)
            return _Lbzip2(raw, tool)
    return _Bz2Reader(raw)


class _Checked:
    """A decoder whose errors on bad bytes are archive errors."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream

    def close(self) -> None:
        """End the decoder's process or threads, if it has them (the others hold nothing to free)."""
        if isinstance(self._stream, (_Lbzip2, _ParallelXz)):
            self._stream.close()

    def read(self, n: int) -> bytes:
        try:
            return self._stream.read(n)
        except CODEC_ERRORS as exc:
            raise corrupt(exc) from exc
        except OSError as exc:
            if exc.errno is not None:  # reading the file failed: not the archive's fault
                raise
            raise corrupt(exc) from exc


class _Bz2Reader:
    """Concatenated bzip2 streams (pbzip2 writes several), then zero padding at most: BZ2File
    ignores what follows a stream that is not bzip2, where the other decoders refuse it."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._dec = bz2.BZ2Decompressor()

    def read(self, n: int) -> bytes:
        if n == 0:
            return b""
        while True:
            if self._dec.eof:
                rest = self._dec.unused_data or self._raw.read(CHUNK)
                if not rest:
                    return b""
                if rest[:1] == b"\0":
                    self._padding(rest)
                    return b""
                self._dec = bz2.BZ2Decompressor()
                out = self._dec.decompress(rest, n)  # anything but another stream raises OSError here
            else:
                data = b""
                if self._dec.needs_input and not (data := self._raw.read(CHUNK)):
                    raise EOFError("Compressed file ended before the end-of-stream marker was reached")
                out = self._dec.decompress(data, n)
            if out:
                return out

    def _padding(self, rest: bytes) -> None:
        """Zeros to the end of the file, or an error (nothing may follow padding)."""
        while rest:
            if rest.count(0) != len(rest):
                raise EOFError("data after the bzip2 stream's zero padding")
            rest = self._raw.read(CHUNK)


class _Lbzip2:
    """bzip2 decoded by lbzip2 on up to LBZIP2_THREADS cores: the example environment's tar.bz2
    unpacks in 7 s on two cores instead of 17 in-process (docs/performance.md). A thread feeds it
    the archive, and reads the archive to its end even when lbzip2 stops early: lbzip2 skips
    without a word whatever follows a stream but another, which StreamEnds finds in the bytes."""

    def __init__(self, raw: BinaryIO, tool: str) -> None:
        pipe = subprocess.PIPE
        env = {k: v for k, v in os.environ.items() if k not in ("LBZIP2", "BZIP2", "BZIP")}  # its option variables
        threads = str(_cores(LBZIP2_THREADS))
        self._proc = subprocess.Popen([tool, "-d", "-c", "-n", threads], stdin=pipe, stdout=pipe, stderr=pipe, env=env)
        stdout = cast(IO[bytes], self._proc.stdout)
        with contextlib.suppress(OSError):  # larger reads than the default 64 KiB pipe
            fcntl.fcntl(stdout.fileno(), fcntl.F_SETPIPE_SZ, CHUNK)
        self._ends = StreamEnds()
        self._failure: BaseException | None = None
        self._feeder = threading.Thread(target=self._feed, args=(raw,), name="lbzip2-feed", daemon=True)
        self._feeder.start()

    def _feed(self, raw: BinaryIO) -> None:
        stdin: IO[bytes] | None = cast(IO[bytes], self._proc.stdin)
        try:
            while chunk := raw.read(CHUNK):
                self._ends.update(chunk)
                if stdin is None:
                    continue
                try:
                    stdin.write(chunk)
                except BrokenPipeError:  # lbzip2 is done: skipping the rest, or failed
                    stdin = None
                    if self._proc.wait() != 0:
                        return
        except BaseException as exc:  # reading the archive failed: raised by read() at the end
            self._failure = exc
        finally:
            with contextlib.suppress(OSError):
                cast(IO[bytes], self._proc.stdin).close()

    def read(self, n: int) -> bytes:
        data = os.read(cast(IO[bytes], self._proc.stdout).fileno(), n)
        if data or n == 0:
            return data
        self._feeder.join()
        if self._failure is not None:
            raise self._failure
        if self._proc.wait() != 0:
            raise self._error()
        if not self._ends.complete():
            raise EOFError("data after a bzip2 stream")
        return b""

    def _error(self) -> Exception:
        """lbzip2's complaint about the bytes as a decoder error; its other failures as what they are."""
        said = cast(IO[bytes], self._proc.stderr).read().decode(errors="replace").strip().splitlines()
        why = said[-1].replace(" stdin:", "") if said else f"lbzip2 exited {self._proc.returncode}"
        if self._proc.returncode > 0 and ("compressed data error" in why or "not a valid bzip2 file" in why):
            return EOFError(why)
        if self._proc.returncode < 0:
            why = f"lbzip2 was killed by signal {-self._proc.returncode}"
        return ConfigError(
            f"decoding the bzip2 archive failed, not for its bytes ({why})",
            "give the start more memory, or take lbzip2 off its PATH to decode in-process",
        )

    def close(self) -> None:
        self._proc.kill()
        self._proc.wait()
        self._feeder.join()
        for pipe in (self._proc.stdout, self._proc.stderr):
            cast(IO[bytes], pipe).close()


class StreamEnds:
    """What lbzip2 would skip, told from the bytes alone, in constant memory: it stops at the
    first bytes after a stream that do not start another, so each stream after the first must
    start right where one ends, and the bytes must end as a stream does, then zeros at most. Only
    bytes made to end as a bzip2 stream does get past this, and bzip2 and GNU tar skip those too."""

    KEEP = 32  # bytes kept of the stream: a stream's end (11) before a start's 10 bytes, and more

    def __init__(self) -> None:
        self.recent = b""  # the last KEEP bytes
        self.seen = 0  # bytes before `recent`'s end
        self.tail = b""  # the last KEEP bytes up to the last nonzero one
        self.zeros = 0  # zero bytes after them
        self.joined = True  # every stream after the first starts where one ends

    def update(self, chunk: bytes) -> None:
        data = self.recent + chunk
        at = data.find(b"BZh", max(0, len(self.recent) - 9))
        while at != -1:
            if len(self.recent) - 10 < at and BZIP2_START.match(data, at) and self.seen - len(self.recent) + at > 0:
                self.joined = self.joined and _ends_a_stream(data[:at])
            at = data.find(b"BZh", at + 1)
        self.recent, self.seen = data[-self.KEEP :], self.seen + len(chunk)
        if stripped := chunk.rstrip(b"\0"):
            self.tail = (self.tail + bytes(min(self.zeros, self.KEEP)) + stripped)[-self.KEEP :]
            self.zeros = len(chunk) - len(stripped)
        else:
            self.zeros += len(chunk)

    def complete(self) -> bool:
        """Every stream joined, and the last ends within the 5 bytes after the last nonzero one
        (its CRC may end in zero bytes), the rest zeros."""
        window = self.tail + bytes(min(self.zeros, 5))
        return self.joined and any(_ends_a_stream(window[:end]) for end in range(len(self.tail), len(window) + 1))


def _ends_a_stream(data: bytes) -> bool:
    """Whether `data` ends as a bzip2 stream does: its end's 48-bit magic, a 32-bit CRC, then 0-7
    bits of padding to a whole byte (which libbz2 ignores, whatever they are)."""
    value = int.from_bytes(data[-11:], "big")
    return len(data) >= 11 and any((value >> (32 + pad)) & (1 << 48) - 1 == BZIP2_END for pad in range(8))


def _xz(raw: BinaryIO) -> object:
    """A file of several xz streams (conda-pack -j) decoded on several threads, else in one."""
    try:
        fd = raw.fileno() if raw.seekable() else -1  # else a download: a forward-only stream
    except (OSError, ValueError):  # bytes in memory
        fd = -1
    spans = xzindex.streams(fd, os.fstat(fd).st_size) if fd >= 0 else None
    if not spans or len(spans) == 1:
        return _XzReader(raw)
    largest = max(span.dictionary for span in spans) + (1 << 20)  # and the decoder's state
    workers = min(_cores(XZ_THREADS), len(spans), XZ_MEMLIMIT // largest)
    if workers < 2:
        return _XzReader(raw)
    try:
        return _ParallelXz(raw, spans, workers)
    except RuntimeError:  # a thread cannot be started (no process left): decoded in one
        return _XzReader(raw)


class _XzReader:
    """Concatenated xz streams decoded within a memory limit (LZMAFile takes no limit, and a
    stream's header picks a dictionary of up to 1.5 GiB, which the decoder fills as it writes)."""

    def __init__(self, raw: BinaryIO | _Span, memlimit: int = XZ_MEMLIMIT) -> None:
        self._raw = raw
        self._memlimit = memlimit
        self._dec = self._decoder()
        self._done = False

    def _decoder(self) -> lzma.LZMADecompressor:
        return lzma.LZMADecompressor(lzma.FORMAT_XZ, memlimit=self._memlimit)

    def read(self, n: int) -> bytes:
        while not self._done:
            if self._dec.eof:
                self._next_stream(self._dec.unused_data)
                continue
            data = b""
            if self._dec.needs_input and not (data := self._raw.read(CHUNK)):
                raise EOFError("Compressed file ended before the end-of-stream marker was reached")
            try:
                out = self._dec.decompress(data, n)
            except lzma.LZMAError as exc:
                if "memory" not in str(exc).lower():
                    raise
                raise self._over_limit() from exc
            if out:
                return out
        return b""

    def _over_limit(self) -> Exception:
        return ArchiveError(
            f"its xz compression needs more than {self._memlimit >> 20} MiB of memory to decode",
            "pack it again with a lower level",
        )

    def _next_stream(self, rest: bytes) -> None:
        """After a stream: the end, or another stream, either after stream padding (NUL bytes, a
        multiple of four, which xz and GNU tar accept)."""
        padding = 0
        while not (data := rest.lstrip(b"\0")):
            padding += len(rest)
            if not (rest := self._raw.read(CHUNK)):
                if padding % 4:
                    raise EOFError("xz stream padding not a multiple of four bytes")
                self._done = True
                return
        if (padding + len(rest) - len(data)) % 4:
            raise EOFError("xz stream padding not a multiple of four bytes")
        self._dec = self._decoder()
        self._dec.decompress(data, 0)  # buffered, decoded by the next read: anything but xz raises there


class _XzPart(_XzReader):
    """One stream of several, read from its part of the file: its blocks' dictionaries were read
    before its turn, so one asking for more memory than they allow is not what the index says."""

    def __init__(self, fd: int, span: xzindex.Span, memlimit: int) -> None:
        super().__init__(_Span(fd, span), memlimit)

    def _over_limit(self) -> Exception:
        return EOFError("an xz block is not where its stream's index says")


class _Span:
    """Part of a file, read at its own offset (os.pread): threads share the file descriptor."""

    def __init__(self, fd: int, span: xzindex.Span) -> None:
        self._fd, self._pos, self._end = fd, span.start, span.end

    def read(self, n: int) -> bytes:
        data = os.pread(self._fd, min(n, self._end - self._pos), self._pos)
        self._pos += len(data)
        return data


class _ParallelXz:
    """Streams decoded by `workers` threads in turn, each stream's chunks read in order: lzma
    releases the GIL, so two threads decode the example's 129-stream tar.xz in 4.8 s instead of
    7.2 (docs/performance.md). The threads share XZ_MEMLIMIT, and each queue holds at most
    PREFETCH_DEPTH chunks, so memory stays bounded whatever the number of streams."""

    def __init__(self, raw: BinaryIO, spans: list[xzindex.Span], workers: int) -> None:
        self._raw, self._spans, self._next = raw, spans, 0
        self._rest = b""  # of the last chunk, past what read() was asked for
        self._queues: list[queue.Queue[bytes | BaseException | None]] = [
            queue.Queue(PREFETCH_DEPTH) for _ in range(workers)
        ]
        self._failed: BaseException | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        for k in range(workers):
            thread = threading.Thread(target=self._decode, args=(k, XZ_MEMLIMIT // workers), name=f"xz{k}", daemon=True)
            try:
                thread.start()
            except RuntimeError:
                self.close()
                raise
            self._threads.append(thread)

    def _decode(self, k: int, memlimit: int) -> None:
        """Streams k, k + workers, …: their chunks, then None after each; an error ends the thread."""
        out = self._queues[k]
        try:
            for span in self._spans[k :: len(self._queues)]:
                reader = _XzPart(self._raw.fileno(), span, memlimit)
                while chunk := reader.read(CHUNK):
                    if self._stop.is_set():
                        return
                    out.put(chunk)
                out.put(None)
        except BaseException as exc:  # raised by read() when the stream's turn comes
            out.put(exc)

    def read(self, n: int) -> bytes:
        if self._failed is not None:
            raise self._failed
        while not self._rest and self._next < len(self._spans):
            item = self._queues[self._next % len(self._queues)].get()
            if isinstance(item, BaseException):
                self._failed = item  # its thread is gone: raised again by any later read
                raise item
            if item is None:
                self._raw.seek(self._spans[self._next].end)  # the progress shown is the file read so far
                self._next += 1
            self._rest = item or b""
        out, self._rest = self._rest[:n], self._rest[n:]
        return out

    def close(self) -> None:
        self._stop.set()
        for thread, out in zip(self._threads, self._queues, strict=False):  # fewer threads if one failed to start
            drain(thread, out)
