"""Pool readers (clip-retrieval naming, DataComp .npz), tiled reads, and the exact search's top-k and k."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from augbench.pool import check_part, gather, iter_tiles, list_parts, read_rows
from augbench.search import QuerySet, TopK, derive_k, search_parts


def _unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _clip_retrieval(root: Path, sizes: list[int], d: int = 16, emb_pad: int = 1, meta_pad: int = 1) -> list[np.ndarray]:
    """A folder as clip-retrieval's writer leaves it: img_emb/img_emb_N.npy (fp16), metadata/metadata_N.parquet
    (pandas, with image_path, caption and the webdataset json columns, LAION's extra columns among them)."""
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir(parents=True)
    out = []
    for i, n in enumerate(sizes):
        emb = _unit(n, d, i)
        np.save(root / f"img_emb/img_emb_{str(i).zfill(emb_pad)}.npy", emb.astype(np.float16))
        pd.DataFrame({"image_path": [f"{i:05d}{r:04d}" for r in range(n)], "caption": [f"cap {i} {r}" for r in range(n)],
                      "url": [f"http://x/{i}/{r}.jpg" for r in range(n)], "key": [f"{i:05d}{r:04d}" for r in range(n)],
                      "similarity": np.linspace(0.3, 0.4, n), "punsafe": 0.01, "pwatermark": 0.1, "LICENSE": "?", "NSFW": "UNLIKELY",
                      "width": 256, "height": 256, "original_width": 640, "original_height": 480, "status": "success",
                      "exif": None}).to_parquet(root / f"metadata/metadata_{str(i).zfill(meta_pad)}.parquet")
        out.append(emb)
    return out


def test_clip_retrieval_parts_pair_by_number_whatever_the_padding(tmp_path: Path) -> None:
    embs = _clip_retrieval(tmp_path, [5, 12, 3], emb_pad=1, meta_pad=4)  # img_emb_1.npy beside metadata_0001.parquet
    parts = list_parts(tmp_path)
    assert [p.name for p in parts] == ["0", "1", "2"]
    assert [p.meta.name for p in parts] == ["metadata_0000.parquet", "metadata_0001.parquet", "metadata_0002.parquet"]
    assert [check_part(p, 16) for p in parts] == [(5, 16), (12, 16), (3, 16)]
    rows = read_rows(parts[1], np.array([11, 0, 7]))
    assert list(rows["url"]) == ["http://x/1/11.jpg", "http://x/1/0.jpg", "http://x/1/7.jpg"]
    assert list(rows["key"]) == ["000010011", "000010000", "000010007"]
    np.testing.assert_allclose(gather(parts, np.array([2, 0, 1]), np.array([1, 4, 11])),
                               np.stack([embs[2][1], embs[0][4], embs[1][11]]).astype(np.float16), atol=1e-6)


def test_ten_or_more_parts_sort_by_number_not_by_name(tmp_path: Path) -> None:
    _clip_retrieval(tmp_path, [2] * 11, emb_pad=2, meta_pad=2)
    assert [p.name for p in list_parts(tmp_path)] == [str(i) for i in range(11)]


def test_missing_metadata_and_row_mismatch_name_the_files(tmp_path: Path) -> None:
    _clip_retrieval(tmp_path, [4, 4])
    (tmp_path / "metadata/metadata_1.parquet").unlink()
    with pytest.raises(ValueError, match=r"img_emb_1\.npy"):
        list_parts(tmp_path)
    pd.DataFrame({"url": ["a"] * 3, "caption": ["b"] * 3}).to_parquet(tmp_path / "metadata/metadata_1.parquet")
    part = list_parts(tmp_path)[1]
    with pytest.raises(ValueError) as err:
        check_part(part)
    assert str(part.emb) in str(err.value) and str(part.meta) in str(err.value) and "4 embeddings" in str(err.value)
    with pytest.raises(ValueError, match="64-d"):
        check_part(list_parts(tmp_path)[0], 64)


def _datacomp_shard(folder: Path, name: str, n: int, compressed: bool = False) -> np.ndarray:
    """A DataComp shard: numpy's savez of b32/l14 image and text embeddings (fp16) beside a parquet of uid, url, text."""
    emb = _unit(n, 24, hash(name) % 1000)
    arrays = {"b32_img": _unit(n, 8, 1).astype(np.float16), "l14_img": emb.astype(np.float16),
              "l14_txt": _unit(n, 24, 2).astype(np.float16)}
    (np.savez_compressed if compressed else np.savez)(folder / f"{name}.npz", **arrays)
    pq.write_table(pa.table({"uid": [f"{name}{r:04x}" for r in range(n)], "url": [f"http://d/{name}/{r}" for r in range(n)],
                             "text": [f"text {r}" for r in range(n)], "original_width": [512] * n,
                             "clip_l14_similarity_score": [0.3] * n}), folder / f"{name}.parquet")
    return emb


def test_datacomp_npz_members_are_read_in_place(tmp_path: Path) -> None:
    a = _datacomp_shard(tmp_path, "0a1b2c", 9)
    b = _datacomp_shard(tmp_path, "ff00aa", 4, compressed=True)  # savez_compressed: decompressed per part
    with zipfile.ZipFile(tmp_path / "0a1b2c.npz") as z:
        assert z.getinfo("l14_img.npy").compress_type == zipfile.ZIP_STORED  # as DataComp ships them
    parts = list_parts(tmp_path, "datacomp", "l14_img")
    assert [check_part(p, 24)[0] for p in parts] == [9, 4]
    tiles = list(iter_tiles(parts[0], 4))
    assert [s for s, _ in tiles] == [0, 4, 8]
    np.testing.assert_allclose(np.concatenate([t for _, t in tiles]), a.astype(np.float16), atol=1e-6)
    np.testing.assert_allclose(gather(parts, np.array([1, 0]), np.array([3, 2])), np.stack([b[3], a[2]]).astype(np.float16), atol=1e-6)
    rows = read_rows(parts[0], np.array([2]))
    assert rows.iloc[0].to_dict() == {"url": "http://d/0a1b2c/2", "caption": "text 2", "key": "0a1b2c0002"}
    with pytest.raises(ValueError, match="l14_image"):
        check_part(list_parts(tmp_path, "datacomp", "l14_image")[0])


def test_rows_are_read_from_their_row_groups_only(tmp_path: Path) -> None:
    _clip_retrieval(tmp_path, [2])
    n = 1000
    pq.write_table(pa.table({"url": [f"u{i}" for i in range(n)], "caption": [f"c{i}" for i in range(n)]}),
                   tmp_path / "metadata/metadata_0.parquet", row_group_size=100)
    np.save(tmp_path / "img_emb/img_emb_0.npy", np.zeros((n, 16), np.float16))
    part = list_parts(tmp_path)[0]
    out = read_rows(part, np.array([999, 5, 450]))
    assert list(out["url"]) == ["u999", "u5", "u450"] and list(out["key"]) == ["0_000000999", "0_000000005", "0_000000450"]


def test_tiled_search_equals_one_faiss_knn_and_ties_do_not_depend_on_tiling(tmp_path: Path) -> None:
    embs = _clip_retrieval(tmp_path, [300, 170, 41], d=16)
    parts = list_parts(tmp_path)
    queries = _unit(25, 16, 9)
    pool = np.concatenate([e.astype(np.float16).astype(np.float32) for e in embs])
    d_ref, i_ref = faiss.knn(queries, pool, 20, metric=faiss.METRIC_INNER_PRODUCT)
    offsets = np.cumsum([0, 300, 170])
    results = []
    for tile in (7, 64, 1000):
        s, p, r = search_parts(parts, 0, [QuerySet("q", queries, 20)], tile)["q"].finish()
        np.testing.assert_allclose(s, d_ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(offsets[p] + r, i_ref)
        results.append((p, r))
    for p, r in results[1:]:
        np.testing.assert_array_equal(p, results[0][0])
        np.testing.assert_array_equal(r, results[0][1])


def test_topk_breaks_ties_by_part_then_row() -> None:
    top = TopK(1, 3)
    top.push(np.array([[0.5, 0.5]], np.float32), 2, np.array([[7, 3]]))
    top.push(np.array([[0.5, 0.9, 0.1]], np.float32), 1, np.array([[8, 1, 0]]))
    s, p, r = top.finish()
    assert s.tolist() == [[np.float32(0.9), 0.5, 0.5]] and p.tolist() == [[1, 1, 2]] and r.tolist() == [[1, 8, 3]]


@pytest.mark.parametrize("n_aug", [64, 128, 256, 512])  # config/imagenet10.yaml's n_aug values ("0.5x" .. "4x" of 128)
def test_one_text_prompt_per_class_reaches_n_aug(tmp_path: Path, n_aug: int) -> None:
    """One prompt per class: k grows with n_aug (the old fixed k_per_query 200 capped 256 and 512 at 200), so every
    class gets n_aug x overfetch ranked candidates from a pool that holds them."""
    import json

    from augbench.retrieve import merge
    from augbench.search import search_block
    from augbench.specs import RetrieveSpec

    classes = ["a", "b", "c"]
    rs = np.random.default_rng(0)
    centres = _unit(3, 32, 5)
    (tmp_path / "pool/img_emb").mkdir(parents=True)
    (tmp_path / "pool/metadata").mkdir(parents=True)
    for i in range(3):  # three parts of unequal size, each holding images of every class
        n = 900 + 300 * i
        x = centres[rs.integers(0, 3, n)] + 0.3 * rs.standard_normal((n, 32))
        np.save(tmp_path / f"pool/img_emb/img_emb_{i}.npy", (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16))
        pd.DataFrame({"url": [f"http://x/{i}/{r}" for r in range(n)], "caption": [""] * n}).to_parquet(
            tmp_path / f"pool/metadata/metadata_{i}.parquet")
    parts = list_parts(tmp_path / "pool")
    (tmp_path / "text").mkdir()
    np.save(tmp_path / "text/queries.npy", centres)
    pd.DataFrame({"label": [0, 1, 2], "query": [f"a photo of a {c}." for c in classes], "class": classes}).to_parquet(
        tmp_path / "text/queries.parquet")
    (tmp_path / "classes.json").write_text(json.dumps({"classes": classes, "names": {}}))
    files = {"text": (tmp_path / "text/queries.npy", tmp_path / "text/queries.parquet")}
    blocks = []
    for b, (lo, hi) in enumerate([(0, 2), (2, 3)]):  # two search blocks, merged
        search_block(parts[lo:hi], lo, files, tmp_path / f"{b}.npz", {"n_aug": n_aug, "overfetch": 2, "margin": 1.1, "tile_rows": 500})
        blocks.append(tmp_path / f"{b}.npz")
    spec = RetrieveSpec(mode="text", n_aug=n_aug, overfetch=2, dedup_threshold=1.01)
    stats = merge(blocks, tmp_path / "text/queries.parquet", parts, tmp_path / "classes.json", [], tmp_path / "n.parquet",
                  tmp_path / "s.json", spec, chunk_rows=700)
    table = pd.read_parquet(tmp_path / "n.parquet")
    assert table.groupby("class").size().to_dict() == dict.fromkeys(classes, 2 * n_aug), stats
    assert not table.duplicated(["part", "row"]).any()
    assert stats["k_per_query"] == derive_k(n_aug, 2, 1.1, 1) >= 2 * n_aug


def test_buffer_accepts_io_of_npy_written_by_numpy_directly(tmp_path: Path) -> None:
    """npy files with a version-2 header (numpy writes one for very wide dtypes/headers) are read too."""
    arr = _unit(6, 4, 3).astype(np.float16)
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, version=(2, 0))
    (tmp_path / "img_emb").mkdir()
    (tmp_path / "metadata").mkdir()
    (tmp_path / "img_emb/img_emb_0.npy").write_bytes(buf.getvalue())
    pd.DataFrame({"url": list("abcdef"), "caption": list("abcdef")}).to_parquet(tmp_path / "metadata/metadata_0.parquet")
    part = list_parts(tmp_path)[0]
    np.testing.assert_array_equal(next(iter_tiles(part, 10))[1], arr.astype(np.float32))
