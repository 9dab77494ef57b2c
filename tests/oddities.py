"""The broken and unusual files a web crawl or a scraped dataset folder holds, built in the formats real tools write.

Each entry: file name -> (bytes, what the workflow's decoder must say: "ok" or the skip reason). Used by the
decoder's unit tests and by the workflow test that plants them in a target folder and a served url pool.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def _save(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def huge_png(width: int = 60000, height: int = 60000) -> bytes:
    """A valid PNG header claiming width x height RGB pixels (10.8 GB decoded) with a few bytes of image data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" + b"\x00" * 30)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def oddities(seed: int = 0) -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, expected verdict)."""
    rs = np.random.default_rng(seed)
    rgb = Image.fromarray(rs.integers(0, 256, (48, 40, 3), dtype=np.uint8), "RGB")
    jpeg = _save(Image.effect_noise((96, 96), 60).convert("RGB"), "JPEG", quality=90)
    grey16 = Image.fromarray((rs.integers(0, 65536, (24, 24))).astype(np.uint16))  # mode I;16
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    frames = [Image.new("RGB", (20, 20), c) for c in ((255, 0, 0), (0, 255, 0))]
    anim = io.BytesIO()
    frames[0].save(anim, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return {
        # broken: counted skips with a reason
        "truncated.jpg": (jpeg[: len(jpeg) // 3], "truncated"),
        "page.jpg": (b"<!DOCTYPE html><html><body>404 - this image is no longer available</body></html>", "not_an_image"),
        "empty.jpg": (b"", "not_an_image"),
        "huge.png": (huge_png(), "too_large"),
        # unusual but valid: decoded
        "cmyk.jpg": (_save(rgb.convert("CMYK"), "JPEG"), "ok"),
        "grey16.png": (_save(grey16, "PNG"), "ok"),
        "grey.png": (_save(rgb.convert("L"), "PNG"), "ok"),
        "palette_alpha.png": (_save(palette, "PNG"), "ok"),
        "rgba.png": (_save(rgb.convert("RGBA"), "PNG"), "ok"),
        "anim.gif": (anim.getvalue(), "ok"),
        "one_pixel.png": (_save(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"), "ok"),
        "wide.webp": (_save(Image.new("RGB", (400, 12), (200, 10, 10)), "WEBP"), "ok"),
        "progressive.jpg": (_save(rgb, "JPEG", progressive=True), "ok"),
        "bitmap.bmp": (_save(rgb, "BMP"), "ok"),
    }
