"""Where the streams of an xz file start, read backwards from its end as `xz --list` does, so that
`conda-pack -j` archives (one stream per 4 MiB of tar) can be decoded on several threads.

This only proposes boundaries: each stream is still decoded and checked by liblzma. A file that
decodes as a whole has exactly these boundaries (liblzma checks every stream's index and footer
against its blocks), and streams that each decode join into the same bytes as the whole (a stream
ends where its own bytes say), so the two ways accept the same files and give the same tar.
Anything unexpected here means "decode it as one stream", never an error.
"""

from __future__ import annotations

import itertools
import os
from typing import NamedTuple

HEADER = b"\xfd7zXZ\x00"
FOOTER = b"YZ"
MAX_PARTS = 1 << 16  # streams and blocks told apart in a file, at most (conda-pack: 2 per 4 MiB of tar)
MAX_INDEX = 1 << 20  # index bytes read per stream, at most
LZMA2 = 0x21
DICT_MAX = 0xFFFFFFFF  # what an LZMA2 dictionary byte of 40 means


class Span(NamedTuple):
    start: int
    end: int  # the next stream's start, or the file's end: a span holds its stream padding
    dictionary: int  # the largest LZMA2 dictionary its blocks ask for: what decoding it takes


def streams(fd: int, size: int) -> list[Span] | None:
    """The file's streams in order, or None if they cannot be told from their indexes."""
    found: list[Span] = []
    end, parts = size, 0
    while end > 0:
        end -= _padding(fd, end)
        stream = _stream(fd, end, MAX_PARTS - parts - 1)
        if stream is None:
            return None
        parts += 1 + len(stream[1])
        if (largest := _largest_dictionary(fd, stream[1])) is None:
            return None
        found.append(Span(stream[0], found[-1].start if found else size, largest))
        end = stream[0]
    return found[::-1] or None


def _largest_dictionary(fd: int, blocks: list[int]) -> int | None:
    largest = 0
    for at in blocks:
        if (size := dictionary(fd, at)) is None:
            return None
        largest = max(largest, size)
    return largest


def _padding(fd: int, end: int) -> int:
    """The zero bytes just before `end` (a footer ends in "YZ", so they are all stream padding),
    read backwards in growing steps: usually there are none."""
    zeros, step = 0, 16
    while end - zeros > 0:
        n = min(end - zeros, step)
        chunk = os.pread(fd, n, end - zeros - n)
        kept = len(chunk.rstrip(b"\0"))
        zeros += len(chunk) - kept
        if kept:
            return zeros
        step = min(step * 2, 1 << 20)
    return zeros


def _stream(fd: int, end: int, budget: int) -> tuple[int, list[int]] | None:
    """Where the stream ending at `end` starts, then where each of its blocks (`budget` at most)
    does: its footer gives its index's size, the index its blocks' sizes."""
    footer = os.pread(fd, 12, end - 12) if end >= 32 else b""
    if len(footer) != 12 or footer[10:] != FOOTER:
        return None
    index_size = (int.from_bytes(footer[4:8], "little") + 1) * 4
    if index_size > MAX_INDEX or index_size > end - 24:
        return None
    sizes = _block_sizes(os.pread(fd, index_size, end - 12 - index_size), budget)
    start = end - 12 - index_size - sum(sizes or [0]) - 12
    if sizes is None or start < 0 or os.pread(fd, 6, start) != HEADER:
        return None
    return start, list(itertools.accumulate(sizes[:-1], initial=start + 12)) if sizes else []


def _block_sizes(index: bytes, budget: int) -> list[int] | None:
    """The sizes of the blocks an index lists (`budget` at most): their unpadded sizes, each padded
    to four."""
    if not index or index[0] != 0:
        return None
    count, at = _varint(index, 1)
    if count > budget or count > len(index) // 2:  # a record takes two bytes at least
        return None
    sizes = []
    for _ in range(count):
        if at >= len(index):
            return None
        unpadded, at = _varint(index, at)
        _, at = _varint(index, at)  # uncompressed size
        sizes.append(-(-unpadded // 4) * 4)
    return sizes if at <= len(index) else None


def _varint(data: bytes, at: int) -> tuple[int, int]:
    """xz's multibyte integer at `at` (7 bits a byte, at most 9 bytes), and where it ends; past the
    data's end if it is cut."""
    value = 0
    for i in range(9):
        if at + i >= len(data):
            break
        value |= (data[at + i] & 0x7F) << (7 * i)
        if not data[at + i] & 0x80:
            return value, at + i + 1
    return value, len(data) + 1


def dictionary(fd: int, block: int) -> int | None:
    """The LZMA2 dictionary size the block at `block` asks for in its header."""
    head = os.pread(fd, 1024, block)
    if not head or head[0] == 0 or len(head) < (head[0] + 1) * 4:  # the index, or cut short
        return None
    header = head[: (head[0] + 1) * 4]
    flags, at = header[1], 2
    for present in (0x40, 0x80):  # compressed, then uncompressed size
        if flags & present:
            _, at = _varint(header, at)
    for _ in range((flags & 3) + 1):
        filter_id, at = _varint(header, at)
        props_size, at = _varint(header, at)
        props, at = header[at : at + props_size], at + props_size
        if filter_id == LZMA2 and len(props) == 1 and props[0] <= 40:
            return DICT_MAX if props[0] == 40 else (2 | props[0] & 1) << (props[0] // 2 + 11)
    return None
