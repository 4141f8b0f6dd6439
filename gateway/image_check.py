"""Whether an input image is whole, at a cost that does not grow with its pixels: a PNG's chunks are walked and its
image data inflated piece by piece and counted, never held; a JPEG is decoded at an eighth of its size. Under gevent
the work runs in gevent's thread pool, so the worker's other requests go on meanwhile."""

from __future__ import annotations

import struct
import sys
import zlib
from collections.abc import Callable
from typing import IO, Any, TypeVar

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PIECE = 1 << 16
CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by PNG colour type
DEPTHS = {0: {1, 2, 4, 8, 16}, 2: {8, 16}, 3: {1, 2, 4, 8}, 4: {8, 16}, 6: {8, 16}}
ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
T = TypeVar("T")


class BrokenImage(ValueError):
    """The file is not a complete, uncorrupted image."""


def png_data_size(width: int, height: int, *, bits: int, channels: int, interlaced: bool) -> int:
    """How many bytes a PNG's image data inflates to: each row (of each Adam7 pass) and its filter byte."""
    def rows(w: int, h: int) -> int:
        return h * (1 + (w * channels * bits + 7) // 8) if w and h else 0

    if not interlaced:
        return rows(width, height)
    return sum(rows((width - x + dx - 1) // dx, (height - y + dy - 1) // dy) for x, y, dx, dy in ADAM7)


def check_png(file: IO[bytes]) -> tuple[int, int, bool]:
    """(width, height, has alpha) of a PNG whose every chunk has its CRC right, whose image data inflates to exactly
    what its header promises, and which ends with IEND. Raises ``BrokenImage``. Memory: a few pieces of PIECE bytes."""
    file.seek(0)
    if file.read(8) != PNG_SIGNATURE:
        raise BrokenImage("not a PNG")
    inflater, expected, produced, alpha, first, ihdr = zlib.decompressobj(), -1, 0, False, True, b""
    while True:
        head = file.read(8)
        if len(head) < 8:
            raise BrokenImage("truncated before IEND")
        length, kind = struct.unpack(">I4s", head)
        if first and kind != b"IHDR":
            raise BrokenImage("IHDR is not first")
        crc, left = zlib.crc32(kind), length
        while left:
            piece = file.read(min(left, PIECE))
            if not piece:
                raise BrokenImage(f"truncated in {kind!r}")
            left -= len(piece)
            crc = zlib.crc32(piece, crc)
            if first:
                ihdr += piece
            elif kind == b"IDAT":
                produced += _inflate(inflater, piece, expected - produced)
        if file.read(4) != struct.pack(">I", crc):
            raise BrokenImage(f"bad CRC in {kind!r}")
        if first:
            expected, alpha = _header(ihdr)
            first = False
        elif kind == b"tRNS":
            alpha = True
        elif kind == b"IEND":
            break
    produced += _inflate(inflater, b"", expected - produced)
    if not inflater.eof or produced != expected:
        raise BrokenImage("the image data is cut off or too long")
    width, height = struct.unpack(">II", ihdr[:8])
    return width, height, alpha


def _header(ihdr: bytes) -> tuple[int, bool]:
    if len(ihdr) != 13:
        raise BrokenImage("bad IHDR")
    width, height, bits, colour, _compression, _filter, interlace = struct.unpack(">IIBBBBB", ihdr)
    if not width or not height or bits not in DEPTHS.get(colour, ()) or interlace > 1:
        raise BrokenImage("bad IHDR")
    size = png_data_size(width, height, bits=bits, channels=CHANNELS[colour], interlaced=bool(interlace))
    return size, colour in (4, 6)


def _inflate(inflater: Any, data: bytes, room: int) -> int:
    """Inflate ``data`` piece by piece, keeping none of it; the bytes produced. Stops past ``room`` (a bomb)."""
    produced, pending = 0, data
    while True:
        try:
            produced += len(inflater.decompress(pending, PIECE))
        except zlib.error as error:
            raise BrokenImage(f"the image data is corrupt ({error})") from None
        pending = inflater.unconsumed_tail
        if produced > room:
            raise BrokenImage("the image data inflates to more than its header says")
        if not pending:
            return produced


def off_the_loop(work: Callable[..., T], *args: Any) -> T:
    """``work(*args)``: in gevent's thread pool when gevent runs this process (zlib and Pillow let go of the GIL
    while they decode, so the worker's other requests go on), else right here."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched("socket"):
        from gevent import get_hub  # type: ignore[import-untyped]

        result: T = get_hub().threadpool.apply(work, args)
        return result
    return work(*args)
