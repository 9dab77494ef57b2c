"""`augbench query`: what does the pool hold for a class? The nearest pool items to a text or an image.

So a researcher can look at the candidates for a class (url, caption, score) before spending
GPU-hours. Uses the ANN index when one is given, else scans the parts exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from augbench.pool import PoolPart, read_rows
from augbench.search import QuerySet, search_parts


def query(text: str | None, image: Path | None, model: str, parts: list[PoolPart], k: int = 10, index: Path | None = None,
          nprobe: int = 16, refine: int = 10) -> dict[str, object]:
    """Print and return the k nearest pool items (part, row, score, url, caption) to a text or an image."""
    from augbench.embed import Clip
    from augbench.imaging import open_rgb

    clip = Clip(model)
    if image is not None:
        if not image.is_file():
            raise FileNotFoundError(f"query: image {image} does not exist")
        vec = clip.images([open_rgb(str(image))])
    else:
        vec = clip.texts([text or ""])
    if index is not None:
        from augbench.index import ann_search, read_index

        top = ann_search(read_index(index, nprobe), parts, vec, k, refine)
    else:
        top = search_parts(parts, 0, [QuerySet("q", vec, k)], 131072)["q"]
    scores, part_idx, rows = (a[0] for a in top.finish())
    ok = rows >= 0
    frames = []
    for p in sorted(set(part_idx[ok])):
        sel = np.flatnonzero(ok & (part_idx == p))
        m = read_rows(parts[int(p)], rows[sel])
        m.index = sel
        frames.append(m.assign(part=parts[int(p)].name, row=rows[sel], score=scores[sel]))
    table = pd.concat(frames).sort_index() if frames else pd.DataFrame(columns=["score", "part", "row", "url", "caption"])
    with pd.option_context("display.max_colwidth", 80, "display.width", 200):
        print(table[["score", "part", "row", "url", "caption"]].to_string(index=False))
    return {"results": len(table)}
