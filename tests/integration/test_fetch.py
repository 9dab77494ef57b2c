"""Fetch survives dead links: over-fetched candidates, placeholders caught by the content check, leak suspects
confirmed on the downloaded pixels, a yield floor that names the classes, and a killed fetch that resumes with
only the urls not yet tried. Everything is served on 127.0.0.1 by a server the test starts."""

from __future__ import annotations

import functools
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import subprocess_env
from PIL import Image, ImageDraw

from augbench.fetch import YieldError, fetch
from augbench.pool import PoolPart
from augbench.specs import DownloadSpec, FetchSpec

CLASSES = ["circle", "square", "triangle"]
PER_CLASS = 10  # candidates per class: n_aug 4 x overfetch 2.5
N_AUG = 4


class Handler(http.server.SimpleHTTPRequestHandler):
    """/ok/X serves a file, /dead/X answers 404, /slow/X does not answer until the test ends (the client times
    out), /placeholder/X an HTTP-200 "image not available" picture; every request is recorded."""

    def do_GET(self) -> None:
        self.server.requests.append(self.path)  # type: ignore[attr-defined]
        kind = self.path.split("/")[1]
        time.sleep(self.server.delay)  # type: ignore[attr-defined]
        if kind == "dead":
            self.send_error(404)
            return
        if kind == "slow":
            self.server.release.wait(60)  # type: ignore[attr-defined]
            return
        if kind == "placeholder":
            self.path = "/placeholder.png"
        else:
            self.path = "/" + self.path.split("/", 2)[2]
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path, http.server.ThreadingHTTPServer]]:
    root = tmp_path / "served"
    root.mkdir()
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    srv.requests = []  # type: ignore[attr-defined]
    srv.delay = 0.0  # type: ignore[attr-defined]
    srv.release = threading.Event()  # type: ignore[attr-defined]
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", root, srv
    finally:
        srv.release.set()  # type: ignore[attr-defined]
        srv.shutdown()
        srv.server_close()


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A toy CLIP trained for a few steps on rendered shapes (enough to tell a picture from another)."""
    import random

    from augbench.specs import ClipSpec
    from augbench.toy.clip_train import save_clip, train_clip
    from augbench.toy.world import render

    r = random.Random(0)
    images = [render(k, r, 32, pool=True)[0] for k in CLASSES * 12]
    model, tokenizer, _ = train_clip(np.stack([np.asarray(i) for i in images]), [f"a photo of a {k}" for k in CLASSES * 12],
                                     ClipSpec(steps=30, batch_size=16, warmup_steps=1, vocab_size=600))
    out = tmp_path_factory.mktemp("clip") / "clip"
    save_clip(model, tokenizer, 32, out)
    return out


def _world(tmp_path: Path, base: str, served: Path, clip: Path) -> tuple[Path, list[PoolPart], list[str]]:
    """Candidates for three classes: per class 4 of 10 urls dead (404) or timing out, 1 a placeholder, 5 good; one good
    candidate per class is a copy of an eval image, flagged as a leak suspect. The pool part holds the embedding of the
    image each url had when the pool was embedded."""
    import random

    from augbench.embed import Clip
    from augbench.toy.world import render

    r = random.Random(1)
    ph = Image.new("RGB", (32, 32), (200, 200, 200))
    ImageDraw.Draw(ph).text((2, 10), "N/A", fill=(90, 90, 90))
    ph.save(served / "placeholder.png")
    (tmp_path / "eval").mkdir()
    rows, images, kinds = [], [], []
    for label, cls in enumerate(CLASSES):
        for rank in range(PER_CLASS):
            img = render(cls, r, 32, pool=True)[0]
            name = f"{cls}_{rank}.png"
            img.save(served / name)
            kind = "dead" if rank in (0, 3) else "slow" if rank in (5, 7) else "placeholder" if rank == 1 else "ok"
            suspects = []
            if rank == 2:  # a copy of an eval image: the merge nominated it, fetch must confirm it on the pixels
                img.save(tmp_path / "eval" / name)
                suspects = [str(tmp_path / "eval" / name), str(tmp_path / "eval" / "other.png")]
            rows.append({"class": cls, "label": label, "rank": rank, "score": 1 - rank / 100, "query": cls, "part": 0,
                         "part_name": "0", "row": len(rows), "key": f"k{len(rows)}", "url": f"{base}/{kind}/{name}",
                         "caption": f"a {cls}", "leak_suspects": suspects})
            images.append(img)
            kinds.append(kind)
    render("star", r, 32, pool=False)[0].save(tmp_path / "eval" / "other.png")
    (tmp_path / "pool/img_emb").mkdir(parents=True)
    (tmp_path / "pool/metadata").mkdir(parents=True)
    np.save(tmp_path / "pool/img_emb/img_emb_0.npy", Clip(clip).images(images).astype(np.float16))
    pd.DataFrame({"url": [r_["url"] for r_ in rows], "caption": [r_["caption"] for r_ in rows]}).to_parquet(
        tmp_path / "pool/metadata/metadata_0.parquet")
    pd.DataFrame(rows).to_parquet(tmp_path / "neighbors.parquet")
    part = PoolPart("0", tmp_path / "pool/img_emb/img_emb_0.npy", tmp_path / "pool/metadata/metadata_0.parquet")
    return tmp_path / "neighbors.parquet", [part], kinds


# a good url answers in milliseconds, a slow one never: a timeout of 4 s holds on a loaded CI machine (1 s did not)
DL = DownloadSpec(timeout=4, retries=0, encode_format="png", encode_quality=9, image_size=32)
# the re-downloaded image has the embedded pixels (lossless PNG at the pool's size): cosine ~1; this toy CLIP puts a
# placeholder at up to 0.93 from a shape, so the test's floor is 0.99 (ViT-L/14's default in the config is 0.85)
SPEC = FetchSpec(min_cosine=0.99, min_yield=1.0)


def test_dead_links_placeholders_and_leaks_are_counted_and_every_class_reaches_n_aug(
        tmp_path: Path, server: tuple, clip: Path) -> None:
    base, served, srv = server
    neighbors, parts, _ = _world(tmp_path, base, served, clip)
    stats = fetch(neighbors, tmp_path / "out.tar", tmp_path / "manifest.parquet", tmp_path / "stats.json", N_AUG, SPEC, CLASSES,
                  cache=tmp_path / "cache", download_spec=DL, model=str(clip), parts=parts, shard_size=7)
    manifest = pd.read_parquet(tmp_path / "manifest.parquet")
    assert manifest.groupby("class").size().to_dict() == dict.fromkeys(CLASSES, N_AUG)
    assert (manifest.groupby("class")["rank"].max() == N_AUG - 1).all()
    assert not manifest["url"].str.contains("/dead/|/slow/|/placeholder/").any()
    assert not manifest["url"].str.contains("_2.png").any(), "confirmed leaks are dropped"
    reasons = stats["by_reason"]
    assert reasons["content_changed"] == 3 and reasons["leaked"] == 3
    assert reasons["http_404"] == 6 and reasons["timeout"] == 6
    assert stats["achieved_min"] == N_AUG and json.loads((tmp_path / "stats.json").read_text())["images"] == 3 * N_AUG
    # the kept images are the first good ones in rank order: ranks 4, 6, 8, 9 of each class
    assert sorted(manifest.loc[manifest["class"] == "circle", "url"].str.extract(r"_(\d+)\.png")[0].astype(int)) == [4, 6, 8, 9]

    # a second fetch of the same candidates asks the server for nothing: every url was tried
    srv.requests.clear()
    fetch(neighbors, tmp_path / "out2.tar", tmp_path / "manifest2.parquet", tmp_path / "stats2.json", N_AUG, SPEC, CLASSES,
          cache=tmp_path / "cache", download_spec=DL, model=str(clip), parts=parts, shard_size=7)
    assert srv.requests == []
    again = pd.read_parquet(tmp_path / "manifest2.parquet")
    assert set(again["shard"]) == {"out2.tar"} and again.drop(columns="shard").equals(manifest.drop(columns="shard"))
    # the pointers lead to the very images of the tar
    from augbench.shards import iter_shard, pointed_images

    assert pointed_images(tmp_path / "manifest2.parquet") == {s.key: s.image for s in iter_shard(tmp_path / "out2.tar")}


def test_with_the_server_gone_the_job_fails_naming_the_classes(tmp_path: Path, server: tuple, clip: Path) -> None:
    base, served, srv = server
    neighbors, parts, _ = _world(tmp_path, base, served, clip)
    srv.shutdown()
    srv.server_close()
    with pytest.raises(YieldError) as err:
        fetch(neighbors, tmp_path / "out.tar", tmp_path / "manifest.parquet", tmp_path / "stats.json", N_AUG, SPEC, CLASSES,
              cache=tmp_path / "cache", download_spec=DL, model=str(clip), parts=parts)
    message = str(err.value)
    assert all(c in message for c in CLASSES) and "connection_error" in message, message
    assert not (tmp_path / "out.tar").exists() and not (tmp_path / "manifest.parquet").exists()


def test_a_killed_fetch_resumes_with_only_the_urls_not_yet_tried(tmp_path: Path, server: tuple, clip: Path) -> None:
    base, served, srv = server
    neighbors, parts, _ = _world(tmp_path, base, served, clip)
    srv.delay = 0.25  # 30 urls at one connection at a time: several seconds, shards of 5 complete one by one
    (tmp_path / "classes.json").write_text(json.dumps({"classes": CLASSES}))
    cmd = [sys.executable, "-m", "augbench", "fetch", "--neighbors", str(neighbors), "--classes", str(tmp_path / "classes.json"),
           "--n-aug", str(N_AUG),
           "--out-tar", str(tmp_path / "out.tar"), "--out-manifest", str(tmp_path / "m.parquet"), "--out-stats", str(tmp_path / "s.json"),
           "--cache", str(tmp_path / "cache"), "--download-spec", json.dumps(DL.__dict__), "--thread-count", "1",
           "--model", str(clip), "--pool-emb", str(parts[0].emb), "--pool-meta", str(parts[0].meta), "--pool-names", "0",
           "--shard-size", "5", "--spec", json.dumps(SPEC.__dict__)]
    proc = subprocess.Popen(cmd, env=subprocess_env(), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((tmp_path / "cache").rglob("*_stats.json"))) < 2:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = list((tmp_path / "cache").rglob("out/*_stats.json"))
    assert 2 <= len(done) < 6, "killed after two of six shards"
    tried = set()
    for st in done:
        tried |= set(pd.read_parquet(st.with_name(st.name.replace("_stats.json", ".parquet")))["url"])
    before = list(srv.requests)
    srv.delay = 0.0
    res = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    asked = {f"{base}{p}" for p in srv.requests[len(before):]}
    assert not asked & tried, "a url of a completed shard was requested again"
    assert asked | tried >= set(pd.read_parquet(neighbors)["url"]), "every url was tried in the end"
    assert pd.read_parquet(tmp_path / "m.parquet").groupby("class").size().to_dict() == dict.fromkeys(CLASSES, N_AUG)


def test_a_prompt_longer_than_the_text_tower_is_truncated_not_a_crash(clip: Path) -> None:
    """The toy CLIP has 16 text positions (CLIP 77): a long retrieval prompt must embed, truncated to them."""
    from augbench.embed import Clip, text_positions

    model = Clip(clip)
    assert text_positions(model.model) == 16
    long = "a photo of a " + " ".join(["very"] * 200) + " large circle."
    emb = model.texts([long, "a photo of a circle."])
    assert emb.shape[0] == 2 and np.isfinite(emb).all()


def test_a_url_good_for_two_classes_goes_to_the_higher_score_and_the_other_backfills(tmp_path: Path, server: tuple) -> None:
    """Two pool rows with one url (LAION repeats urls) reach circle (label 0) at score 0.5 and square (label 1) at 0.9:
    square keeps the image, as the merge's rule says (by score, not by label order), and circle takes its next
    candidate, counting the `conflict`."""
    base, served, _ = server
    rows = []
    for label, cls in enumerate(CLASSES[:2]):
        for rank in range(3):
            name = "shared.png" if rank == 0 else f"{cls}_{rank}.png"
            Image.new("RGB", (32, 32), (40 * rank + 20 * label, 90, 200 - 30 * rank)).save(served / name)
            score = (0.5 if label == 0 else 0.9) if rank == 0 else 0.4 - rank / 100
            rows.append({"class": cls, "label": label, "rank": rank, "score": score,
                         "query": cls, "part": 0, "part_name": "0", "row": len(rows), "key": f"k{len(rows)}",
                         "url": f"{base}/ok/{name}", "caption": cls, "leak_suspects": []})
    pd.DataFrame(rows).to_parquet(tmp_path / "neighbors.parquet")
    stats = fetch(tmp_path / "neighbors.parquet", tmp_path / "out.tar", tmp_path / "m.parquet", tmp_path / "s.json", 2,
                  FetchSpec(min_cosine=None, min_yield=1.0), CLASSES[:2], cache=tmp_path / "cache", download_spec=DL)
    manifest = pd.read_parquet(tmp_path / "m.parquet")
    by_class = manifest.groupby("class")["url"].apply(lambda u: sorted(x.rsplit("/", 1)[1] for x in u)).to_dict()
    assert by_class == {"circle": ["circle_1.png", "circle_2.png"], "square": ["shared.png", "square_1.png"]}, by_class
    assert stats["per_class_reasons"] == {"circle": {"conflict": 1}, "square": {}}
