"""img2dataset over loopback with planted failures; a follow-up run asks only for the failed urls."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
from PIL import Image

from augbench.shards import iter_shard


def _download(urls: Path, out: Path, timeout: float = 2.0) -> subprocess.CompletedProcess[str]:
    spec = json.dumps({"timeout": timeout, "retries": 0})
    cmd = [sys.executable, "-m", "augbench", "download", "--urls", str(urls), "--out-tar", str(out / "p.tar"),
           "--out-status", str(out / "p.parquet"), "--out-stats", str(out / "p_stats.json"),
           "--cache", str(out / "cache"), "--spec", spec, "--thread-count", "8"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_planted_failures_are_counted_and_only_they_are_retried(recording_server, tmp_path: Path) -> None:
    base, root, requests = recording_server
    good = []
    for i in range(6):
        Image.new("RGB", (40, 40), (40 * i, 100, 0)).save(root / f"ok{i}.jpg", quality=95)
        good.append(f"ok{i}.jpg")
    buf = io.BytesIO()
    Image.effect_noise((128, 128), 60).convert("RGB").save(buf, "JPEG")
    (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    (root / "page.jpg").write_text("<html>this is not an image</html>")
    silent = socket.socket()  # accepts connections, never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    rows = [{"key": f"g{i}", "url": f"{base}/{u}", "caption": f"good {i}"} for i, u in enumerate(good)]
    rows += [
        {"key": "missing", "url": f"{base}/missing.jpg", "caption": "404"},
        {"key": "silent", "url": f"http://127.0.0.1:{silent.getsockname()[1]}/x.jpg", "caption": "no answer"},
        {"key": "page", "url": f"{base}/page.jpg", "caption": "html"},
        {"key": "truncated", "url": f"{base}/truncated.jpg", "caption": "cut"},
    ]
    urls = tmp_path / "urls.parquet"
    pd.DataFrame(rows).to_parquet(urls)
    out = tmp_path / "out"
    try:
        first = _download(urls, out)
        assert first.returncode == 0, first.stderr[-3000:]
        stats = json.loads((out / "p_stats.json").read_text())
        assert stats["successes"] == 6 and stats["failed"] == 4
        assert stats["failures_by_reason"] == {"http_404": 1, "timeout": 1, "undecodable_image": 2}
        status = pd.read_parquet(out / "p.parquet").set_index("key")
        assert status.loc["missing", "reason"] == "http_404"
        assert status.loc["silent", "reason"] == "timeout"
        assert set(status.loc[["page", "truncated"], "reason"]) == {"undecodable_image"}
        assert sorted(s.key for s in iter_shard(out / "p.tar")) == sorted(f"g{i}" for i in range(6))

        # the follow-up run: the 404 now exists; only the four failed urls may be requested again
        Image.new("RGB", (40, 40), (0, 0, 200)).save(root / "missing.jpg")
        requests.clear()
        second = _download(urls, out)
        assert second.returncode == 0, second.stderr[-3000:]
        assert sorted(requests) == sorted(["/missing.jpg", "/page.jpg", "/truncated.jpg"])  # the silent one is another server
        stats = json.loads((out / "p_stats.json").read_text())
        assert stats["successes"] == 7 and stats["cached"] == 6 and stats["requested"] == 4
        assert stats["failures_by_reason"] == {"timeout": 1, "undecodable_image": 2}
        assert "missing" in {s.key for s in iter_shard(out / "p.tar")}
    finally:
        silent.close()
