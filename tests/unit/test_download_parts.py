"""Splitting a pool into download parts keeps every row once and drops hidden columns."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from augbench.download import failure_reason, split_parts


def test_split_parts_covers_every_row_once(tmp_path: Path) -> None:
    pool = pd.DataFrame({"key": [f"{i:03d}" for i in range(10)], "file": [f"pool/images/{i}.png" for i in range(10)],
                         "caption": ["c"] * 10, "true_label": range(10)})
    pool.to_parquet(tmp_path / "pool.parquet")
    outs = [tmp_path / f"part{i}.parquet" for i in range(3)]
    for batch_rows in (1 << 20, 3):  # read whole, and streamed in batches that straddle the part bounds
        assert split_parts(tmp_path / "pool.parquet", outs, batch_rows=batch_rows) == [3, 4, 3]
        parts = pd.concat([pd.read_parquet(o) for o in outs])
        assert list(parts["key"]) == list(pool["key"])
        assert list(parts.columns) == ["key", "url", "caption"]  # the hidden label is not passed on
        assert list(parts["url"]) == list(pool["file"])
    # a url list without keys: the row number is the key
    pd.DataFrame({"url": [f"http://x/{i}" for i in range(5)], "caption": ["c"] * 5}).to_parquet(tmp_path / "urls.parquet")
    assert split_parts(tmp_path / "urls.parquet", outs[:2], batch_rows=2) == [2, 3]
    assert list(pd.read_parquet(outs[1])["key"]) == ["000000002", "000000003", "000000004"]


def test_split_parts_names_missing_columns(tmp_path: Path) -> None:
    pd.DataFrame({"link": ["x"]}).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad\.parquet.*caption"):
        split_parts(tmp_path / "bad.parquet", [tmp_path / "o.parquet"])


def test_failure_reasons() -> None:
    assert failure_reason("HTTP Error 404: Not Found") == "http_404"
    assert failure_reason("timed out") == "timeout"
    assert failure_reason("Image decoding error") == "undecodable_image"
    assert failure_reason("[Errno 111] Connection refused") == "connection_error"


def test_a_served_files_identity_is_its_path_and_its_bytes(tmp_path: Path) -> None:
    """The download cache is keyed by this identity: a rebuilt world reuses paths for other pictures, and keyed by
    path alone the cache would hand back the old world's images (the end-to-end test rebuilds one)."""
    from augbench.download import served_identity

    (tmp_path / "pool").mkdir()
    (tmp_path / "pool/7.png").write_bytes(b"old picture")
    old = served_identity(tmp_path, "pool/7.png")
    assert old.startswith("pool/7.png#sha256=")
    (tmp_path / "pool/7.png").write_bytes(b"new picture")
    assert served_identity(tmp_path, "pool/7.png") != old
    (tmp_path / "pool/7.png").write_bytes(b"old picture")
    assert served_identity(tmp_path, "pool/7.png") == old
