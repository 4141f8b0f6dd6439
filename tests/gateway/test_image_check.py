"""Checking input images without holding their pixels (gateway/image_check.py)."""

from __future__ import annotations

import io
import struct
import tracemalloc
import zlib

import pytest
from PIL import Image

from gateway.image_check import ADAM7, BrokenImage, check_png


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width: int, height: int, raw: bytes, *, colour: int = 2, interlace: int = 0) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, interlace)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def pillow_png(mode: str, size: tuple[int, int] = (37, 21), **options: object) -> bytes:
    out = io.BytesIO()
    Image.new(mode, size).save(out, "PNG", **options)
    return out.getvalue()


@pytest.mark.parametrize("mode,alpha", [("RGB", False), ("RGBA", True), ("L", False), ("LA", True), ("P", False),
                                        ("1", False), ("I;16", False)])
def test_pngs_of_every_kind_pass_with_their_alpha(mode: str, alpha: bool) -> None:
    assert check_png(io.BytesIO(pillow_png(mode))) == (37, 21, alpha)


def test_a_palette_png_with_transparency_has_alpha() -> None:
    assert check_png(io.BytesIO(pillow_png("P", transparency=0)))[2]


def test_an_interlaced_png_passes() -> None:
    width, height = 13, 11
    raw = b"".join(b"\x00" + bytes(3 * ((width - x + dx - 1) // dx))
                   for x, y, dx, dy in ADAM7 if (width - x + dx - 1) // dx
                   for _ in range((height - y + dy - 1) // dy))
    data = png(width, height, raw, interlace=1)
    with Image.open(io.BytesIO(data)) as image:
        image.load()  # Pillow agrees it is whole
    assert check_png(io.BytesIO(data)) == (13, 11, False)


def test_truncated_corrupt_short_and_long_pngs_are_broken() -> None:
    whole = pillow_png("RGB", (64, 64))
    for cut in (10, 30, len(whole) // 2, len(whole) - 13, len(whole) - 1):
        with pytest.raises(BrokenImage):
            check_png(io.BytesIO(whole[:cut]))
    flipped = bytearray(whole)
    flipped[len(whole) // 2] ^= 0xFF
    with pytest.raises(BrokenImage):
        check_png(io.BytesIO(bytes(flipped)))
    row = b"\x00" + bytes(3 * 8)
    with pytest.raises(BrokenImage):
        check_png(io.BytesIO(png(8, 8, row * 7)))  # a row short
    with pytest.raises(BrokenImage):
        check_png(io.BytesIO(png(8, 8, row * 9)))  # a row too many


def test_a_6000x6000_png_of_zeros_is_checked_in_bounded_memory() -> None:
    bomb = pillow_png("RGBA", (6000, 6000))
    assert len(bomb) < 1_000_000
    tracemalloc.start()
    try:
        assert check_png(io.BytesIO(bomb)) == (6000, 6000, True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024  # decoding it whole takes 144 MB
