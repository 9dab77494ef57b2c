"""The workflow's one decoder: what decodes, what is a counted skip (by reason), and what is an error."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from oddities import huge_png, oddities

from augbench.imaging import UndecodableImage, decode, decode_many, open_rgb


@pytest.mark.parametrize(("name", "data", "verdict"), [(n, d, v) for n, (d, v) in oddities().items()], ids=list(oddities()))
def test_each_oddity_decodes_or_is_skipped_with_its_reason(name: str, data: bytes, verdict: str, tmp_path: Path) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    if verdict == "ok":
        img = open_rgb(str(path))
        assert img.mode == "RGB" and img.width >= 1
        arr = decode(str(path), 16)
        assert arr.shape == (16, 16, 3) and arr.dtype == np.uint8
    else:
        with pytest.raises(UndecodableImage) as exc:
            open_rgb(str(path))
        assert exc.value.reason == verdict and name in str(exc.value)


def test_transparency_is_composited_on_white_and_16_bit_grey_keeps_its_range() -> None:
    from PIL import Image

    clear = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    import io

    buf = io.BytesIO()
    clear.save(buf, "PNG")
    assert np.asarray(open_rgb(buf.getvalue())).min() == 255  # fully transparent: white, not black or red
    grey = Image.fromarray(np.full((4, 4), 65535, np.uint16))
    buf = io.BytesIO()
    grey.save(buf, "PNG")
    assert np.asarray(open_rgb(buf.getvalue())).min() == 255  # full-scale 16-bit is white, not clipped or wrapped


def test_a_missing_or_unreadable_file_is_an_error_naming_it_not_a_skip(tmp_path: Path) -> None:
    missing = tmp_path / "moved" / "a.png"
    with pytest.raises(FileNotFoundError, match=r"a\.png"):
        decode_many([(0, str(missing))], 8, "test split")
    import os
    import tempfile

    folder = Path(tempfile.mkdtemp())  # outside pytest's root-only tmp tree, traversable by anyone: only the file is locked
    folder.chmod(0o755)
    locked = folder / "locked.png"
    locked.write_bytes(oddities()["grey.png"][0])
    locked.chmod(0)

    as_root = os.geteuid() == 0
    try:
        if as_root:  # root reads anything: read as nobody for the duration of the check
            os.setegid(65534)
            os.seteuid(65534)
        with pytest.raises(PermissionError, match=r"locked\.png"):
            decode_many([(0, str(locked))], 8, "test split")
    finally:
        if as_root:
            os.seteuid(0)
            os.setegid(0)
        locked.chmod(0o644)
        locked.unlink()
        folder.rmdir()


def test_decode_many_counts_skips_by_reason(tmp_path: Path) -> None:
    items = []
    for name, (data, _) in oddities().items():
        (tmp_path / name).write_bytes(data)
        items.append((name, str(tmp_path / name)))
    skips: Counter[str] = Counter()
    arr, tags = decode_many(items, 8, "oddities", skips)
    expected = Counter(v for _, v in oddities().values() if v != "ok")
    assert skips == expected
    assert len(tags) == sum(v == "ok" for _, v in oddities().values()) == len(arr)


def test_the_oversized_header_is_refused_without_allocating_it(tmp_path: Path) -> None:
    """60000 x 60000 RGB is 10.8 GB: refused from the header, in a process whose peak memory stays small."""
    path = tmp_path / "huge.png"
    path.write_bytes(huge_png())
    code = ("import resource, sys; from augbench.imaging import open_rgb, UndecodableImage\n"
            "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            f"try:\n    open_rgb({str(path)!r})\nexcept UndecodableImage as e:\n    print(e.reason)\n"
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    reason, grew_mb = out.stdout.split()
    assert reason == "too_large" and int(grew_mb) < 50, out.stdout


def test_float_greyscale_is_scaled_by_its_range_and_an_animation_gives_its_first_frame() -> None:
    import io

    from PIL import Image

    ramp = Image.fromarray(np.tile(np.linspace(0.0, 1000.0, 16, dtype=np.float32), (4, 1)), "F")  # a float TIFF
    buf = io.BytesIO()
    ramp.save(buf, "TIFF")
    got = np.asarray(open_rgb(buf.getvalue()))
    assert got.shape == (4, 16, 3) and got[0, 0, 0] == 0 and got[0, -1, 0] == 255  # 0..1000 onto 0..255, not clipped
    assert (np.diff(got[0, :, 0].astype(int)) >= 0).all() and 110 < got[0, 8, 0] < 160  # 533 of 1000: mid-grey, not 255
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    first = np.asarray(open_rgb(buf.getvalue()))
    assert first[..., 0].min() > 200 and first[..., 1].max() < 50  # red: the first frame, not the last
