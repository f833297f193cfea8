"""Decoders for compressed tars: gzip (isal), zstd, bzip2 (lbzip2, else libbz2) and xz, each read
as one byte stream.

A decoder's complaint about the bytes becomes the one archive error here and only here, so an
exception anywhere else is a bug, not "a corrupt archive".
"""

from __future__ import annotations

import bz2
import contextlib
import lzma
import os
import shutil
import subprocess
import threading
from typing import IO, BinaryIO, cast

import zstandard
from isal import igzip, isal_zlib

from entrypoint.archive import CHUNK, corrupt
from entrypoint.errors import ArchiveError

# What an xz stream may make its decoder allocate: a 128 MiB dictionary (zstd's default window
# bound; xz -9 uses 64 MiB, conda-pack's default level 8 MiB) and its state.
XZ_MEMLIMIT = 136 << 20
# A bzip2 stream ends in this 48-bit magic, its 32-bit CRC, then 0–7 zero bits to a whole byte.
BZIP2_END = 0x177245385090
# The codecs' errors on bad bytes: isal's gzip reader raises OSError without errno (BadGzipFile)
# and EOFError; bzip2 likewise.
CODEC_ERRORS = (EOFError, lzma.LZMAError, zstandard.ZstdError, cast("type[Exception]", isal_zlib.error))


def decoder(fmt: str, raw: BinaryIO) -> IO[bytes]:
    if fmt == "tar.gz":
        stream: object = igzip.IGzipFile(fileobj=raw, mode="rb")  # type: ignore[no-untyped-call]
    elif fmt == "tar.zst":
        stream = zstandard.ZstdDecompressor().stream_reader(raw, read_size=CHUNK, read_across_frames=True)
    elif fmt == "tar.bz2":
        tool = shutil.which("lbzip2")
        stream = _Bz2Reader(raw) if tool is None else _Lbzip2(raw, tool)
    else:
        stream = _XzReader(raw)
    return cast(IO[bytes], _Checked(cast(IO[bytes], stream)))


class _Checked:
    """A decoder whose errors on bad bytes are archive errors."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream

    def close(self) -> None:
        """End the decoder's process, if it has one (the others hold nothing the reader must free)."""
        if isinstance(self._stream, _Lbzip2):
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
    """bzip2 decoded by lbzip2 on every core: the seed environment's tar.bz2 unpacks in 6 s on two
    cores instead of libbz2's 15 (docs/performance.md). A thread feeds it the archive, watching the
    bytes' end: lbzip2 reads on past anything but another stream without a word, so the archive
    must end as a bzip2 stream does, then zeros at most, as _Bz2Reader requires."""

    def __init__(self, raw: BinaryIO, tool: str) -> None:
        pipe = subprocess.PIPE
        self._proc = subprocess.Popen([tool, "-d", "-c"], stdin=pipe, stdout=pipe, stderr=pipe)
        self._end = StreamEnd()
        self._failure: BaseException | None = None
        self._feeder = threading.Thread(target=self._feed, args=(raw,), name="lbzip2-feed", daemon=True)
        self._feeder.start()

    def _feed(self, raw: BinaryIO) -> None:
        stdin = cast(IO[bytes], self._proc.stdin)
        try:
            while chunk := raw.read(CHUNK):
                self._end.update(chunk)
                stdin.write(chunk)
        except BrokenPipeError:
            pass  # lbzip2 stopped reading: its exit status says why
        except BaseException as exc:  # reading the archive failed: raised by read() at the end
            self._failure = exc
        finally:
            with contextlib.suppress(OSError):
                stdin.close()

    def read(self, n: int) -> bytes:
        data = os.read(cast(IO[bytes], self._proc.stdout).fileno(), n)
        if data or n == 0:
            return data
        self._feeder.join()
        if self._failure is not None:
            raise self._failure
        if self._proc.wait() != 0:
            why = cast(IO[bytes], self._proc.stderr).read().decode(errors="replace").strip().splitlines()
            raise EOFError(why[-1].replace(" stdin:", "") if why else f"lbzip2 exited {self._proc.returncode}")
        if not self._end.ends_a_bzip2_stream():
            raise EOFError("data after the last bzip2 stream")
        return b""

    def close(self) -> None:
        self._proc.kill()
        self._proc.wait()
        self._feeder.join()
        for pipe in (self._proc.stdout, self._proc.stderr):
            cast(IO[bytes], pipe).close()


class StreamEnd:
    """The bytes of a stream before its trailing zeros: enough to tell whether they end a bzip2
    stream, whatever the stream's length."""

    KEEP = 16  # the 11 bytes an end takes, and the 5 zero bytes its CRC may end in

    def __init__(self) -> None:
        self.tail = b""  # the last bytes up to the last nonzero one
        self.zeros = 0  # zero bytes after them

    def update(self, chunk: bytes) -> None:
        data = chunk.rstrip(b"\0")
        if not data:
            self.zeros += len(chunk)
            return
        self.tail = (self.tail + bytes(min(self.zeros, self.KEEP)) + data)[-self.KEEP :]
        self.zeros = len(chunk) - len(data)

    def ends_a_bzip2_stream(self) -> bool:
        """Whether a bzip2 end lies within the 5 bytes after the last nonzero one (a CRC may end in
        zero bytes), the rest zeros."""
        window = self.tail + bytes(min(self.zeros, 5))
        for end in range(len(self.tail), len(window) + 1):
            value = int.from_bytes(window[max(0, end - 11) : end], "big")
            for pad in range(8):  # zero bits after the CRC, to a whole byte
                if value & ((1 << pad) - 1) == 0 and (value >> (32 + pad)) & ((1 << 48) - 1) == BZIP2_END:
                    return True
        return False


class _XzReader:
    """Concatenated xz streams decoded within XZ_MEMLIMIT (LZMAFile takes no limit, and a stream's
    header picks a dictionary of up to 1.5 GiB, which the decoder fills as it writes)."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._dec = self._decoder()
        self._done = False

    @staticmethod
    def _decoder() -> lzma.LZMADecompressor:
        return lzma.LZMADecompressor(lzma.FORMAT_XZ, memlimit=XZ_MEMLIMIT)

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
                raise ArchiveError(
                    f"its xz compression needs more than {XZ_MEMLIMIT >> 20} MiB of memory to decode (a dictionary "
                    "over 128 MiB)",
                    "pack it again with a lower level",
                ) from exc
            if out:
                return out
        return b""

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
