"""Decoders for compressed tars: gzip (isal), zstd, bzip2 and xz, each read as one byte stream.

A decoder's complaint about the bytes becomes the one archive error here and only here, so an
exception anywhere else is a bug, not "a corrupt archive".
"""

from __future__ import annotations

import bz2
import lzma
from typing import IO, BinaryIO, cast

import zstandard
from isal import igzip, isal_zlib

from entrypoint.archive import CHUNK, corrupt
from entrypoint.errors import ArchiveError

# What an xz stream may make its decoder allocate: a 128 MiB dictionary (zstd's default window
# bound; xz -9 uses 64 MiB, conda-pack's default level 8 MiB) and its state.
XZ_MEMLIMIT = 136 << 20
# The codecs' errors on bad bytes: isal's gzip reader raises OSError without errno (BadGzipFile)
# and EOFError; bzip2 likewise.
CODEC_ERRORS = (EOFError, lzma.LZMAError, zstandard.ZstdError, cast("type[Exception]", isal_zlib.error))


def decoder(fmt: str, raw: BinaryIO) -> IO[bytes]:
    if fmt == "tar.gz":
        stream: object = igzip.IGzipFile(fileobj=raw, mode="rb")  # type: ignore[no-untyped-call]
    elif fmt == "tar.zst":
        stream = zstandard.ZstdDecompressor().stream_reader(raw, read_size=CHUNK, read_across_frames=True)
    elif fmt == "tar.bz2":
        stream = _Bz2Reader(raw)
    else:
        stream = _XzReader(raw)
    return cast(IO[bytes], _Checked(cast(IO[bytes], stream)))


class _Checked:
    """A decoder whose errors on bad bytes are archive errors."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream

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
