"""The report: results table, accuracy-vs-n_aug plot, image grids and compute cost per method.

The table has one row per (method, n_aug), mean and std of top-1 over seeds.

For retrieval methods it adds the leaked images removed and, in the toy world only (where the
pool's hidden true labels exist), `retrieval_precision`: the share of the images actually used
for training whose true label is the class they were retrieved for. For generation methods it adds
`generation_fidelity`: the share of generated images CLIP assigns, zero-shot, to their intended class, and
(with `report.judge`) `judge_fidelity`: the same share by the judge, a classifier trained on the target's own
labelled images (train, train_extra, val), which shares no weights with CLIP or the generator.
Every row gets its price (`cpu_hours`, `gpu_hours`, `cost_hours`) from the jobs' own logged CPU
seconds (the Snakemake `benchmark:` files where a log has none, and for wall time), and
`gain_per_hour`, top-1 points over `real` per hour of that price.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from augbench.classify import read_metrics
from augbench.imaging import UndecodableImage, open_rgb
from augbench.io import atomic_path, write_parquet
from augbench.methods import BASELINES, generator_name, row_name, unfiltered
from augbench.methods import method as method_of
from augbench.shards import read_pointed

log = logging.getLogger(__name__)

COLUMNS = ["method", "generator", "guidance", "n_aug", "n_aug_min", "n_aug_median", "seeds", "top1_mean", "top1_std",
           "top5_mean", "retrieval_precision", "diversity", "kid_real",
           "leaked_removed", "generation_fidelity", "judge_fidelity", "skipped_train", "skipped_aug", "skipped_test"]


# Benchmark files by stage (paths under benchmarks/<dataset>/), and which stages ask for a GPU in every run; the workflow
# passes the others where its config puts them on a GPU (search and retrieve with retrieve.gpu, fetch's content check
# for a remote pool, the judge): report --gpu-stages.
GPU_STAGES = {"pretrain_clip", "pretrain_diffusion", "embed_pool", "embed_target", "personalize", "generate", "collect", "filter",
              "train"}
SHARED_BY_FAMILY = {
    "baseline": ("world", "target"),
    # exact search blocks serve both query modes; the ANN index (retrieve.search: index) likewise
    "retrieval": ("world", "target", "download", "pretrain_clip", "embed_pool", "embed_target", "queries", "search", "index"),
    "generated": ("world", "target", "download", "pretrain_clip", "pretrain_diffusion"),
}


CPU_LINE = re.compile(r"augbench \S+ done in [0-9.]+s \(cpu ([0-9.]+)s\)")
STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ", re.M)
ALLOCATION = re.compile(r" \[slurm job (\d+)\]$", re.M)  # on a command's first log line (augbench.cli.main)


def logged_span(log_file: Path) -> tuple[float, float, str | None] | None:
    """(start, end, Slurm allocation) of an augbench command, from its log's first and last time stamps and the
    allocation id on its first line (None where the log is missing or has no time stamp)."""
    import datetime as dt

    try:
        text = log_file.read_text(errors="replace")
    except OSError:
        return None
    stamps = STAMP.findall(text)
    if not stamps:
        return None

    def epoch(stamp: tuple[str, str]) -> float:
        return dt.datetime.strptime(stamp[0], "%Y-%m-%d %H:%M:%S").replace(tzinfo=dt.UTC).timestamp() + int(stamp[1]) / 1000

    first_line = text.split("\n", 1)[0]
    alloc = ALLOCATION.search(first_line)
    return epoch(stamps[0]), epoch(stamps[-1]), alloc.group(1) if alloc else None


def logged_cpu(log_file: Path) -> float | None:
    """The CPU seconds on the closing line of an augbench command's log (None without one)."""
    try:
        found = CPU_LINE.findall(log_file.read_text(errors="replace"))
    except OSError:
        return None
    return float(found[-1]) if found else None


def read_benchmarks(folder: Path, logs: Path | None = None) -> pd.DataFrame:
    """Every Snakemake `benchmark:` file under `folder` as rows (stage, key, wall s, cpu s).

    `key` is the path below the stage folder without suffix: `retrieval_image` for fetch,
    `prompt_classname/circle` for generate, `real/0/1` for train. Unreadable files are logged and skipped.
    CPU seconds come from the job's own log (`logs/<same path>.log`, see `augbench.cli.cpu_seconds`)
    where it has them: the benchmark's `cpu_time` is its last 30-s sample, which misses up to 30 s of a job.
    """
    rows = []
    for path in sorted(Path(folder).rglob("*.tsv")):
        rel = path.relative_to(folder).with_suffix("")
        parts = rel.parts
        if parts[0] == "embed":  # embed/pool/<part>, embed/target/<split>
            stage, key = f"embed_{parts[1]}", "/".join(parts[2:])
        else:
            stage, key = parts[0], "/".join(parts[1:])
        try:
            bench = pd.read_csv(path, sep="\t")
            wall, cpu = float(bench["s"].iloc[-1]), float(bench["cpu_time"].iloc[-1])
        except (OSError, KeyError, IndexError, ValueError, pd.errors.ParserError) as exc:
            log.warning("report: %s: unreadable benchmark file skipped (%s)", path, exc)
            continue
        own = logged_cpu(logs / rel.with_suffix(".log")) if logs is not None else None
        if own is not None:
            cpu = own
        span = logged_span(logs / rel.with_suffix(".log")) if logs is not None else None
        start, end, alloc = span if span else (np.nan, np.nan, None)
        rows.append({"stage": stage, "key": key, "wall_s": wall, "cpu_s": cpu, "start": start, "end": end, "alloc": alloc})
    return pd.DataFrame(rows, columns=["stage", "key", "wall_s", "cpu_s", "start", "end", "alloc"])


def gpu_seconds(bench: pd.DataFrame, gpu_stages: set[str]) -> pd.Series:
    """Each job's GPU-seconds: its wall time on a GPU stage; jobs that shared one Slurm allocation (a group job: block
    chains on one GPU) split the allocation's span (first start to last end) in proportion to their wall time, so the
    allocation is counted once, not once per member."""
    on_gpu = bench["stage"].isin(gpu_stages)
    out = pd.Series(np.where(on_gpu, bench["wall_s"], 0.0), index=bench.index, dtype=float)
    shared = bench[on_gpu & bench["alloc"].notna()]
    for _, members in shared.groupby("alloc"):
        if len(members) < 2 or members["start"].isna().any():
            continue
        span = float(members["end"].max() - members["start"].min())
        out[members.index] = span * members["wall_s"] / members["wall_s"].sum()
    return out


def _family(method: str) -> str:
    return method_of(method).family


def _own_rows(bench: pd.DataFrame, method: str) -> pd.Series:
    """The jobs that served this method alone: its blocks, its fetch, its mode's merge and downloads. A filtered row
    also pays its filter and its row's generation, whose chunks its candidates reuse (the images it chose from)."""
    own = pd.Series(False, index=bench.index)
    if _family(method) == "retrieval":
        mode = method_of(method).retrieval_mode
        own |= bench["stage"].isin(["retrieve", "download_retrieved", "queries"]) & (bench["key"] == mode)
        own |= (bench["stage"] == "fetch") & (bench["key"] == method)
    elif method not in BASELINES:  # its personalisation is shared with its generator's other guidance rows
        for row in dict.fromkeys([method, unfiltered(method)]):
            own |= (bench["stage"] == "generate") & bench["key"].str.startswith(f"{row}/")
        own |= (bench["stage"] == "collect") & (bench["key"] == method)
    own |= (bench["stage"] == "filter") & (bench["key"] == method)
    return own


def personalisation_row(row: str) -> str:
    """The personalisation a generated row reads: `<method>@<generator>` for `<method>@<generator>-g<scale>` (guidance
    changes only sampling: the rows of one generator share it), else the row itself."""
    return row_name(method_of(row).name, generator_name(row))


def _shared_stages(method: str) -> set[str]:
    """Stages whose jobs serve every method of a family (each such job's cost is divided among the rows it served)."""
    stages = set(SHARED_BY_FAMILY[_family(method)])
    if _family(method) == "retrieval":
        stages -= {"queries"}  # one queries job per mode: the method's own
    if _family(method) == "generated" and method_of(method).learns == "cond_clusters":
        stages |= {"embed_target", "pretrain_clip"}  # clusters come from the CLIP embeddings of the training images
    return stages


def method_cost(bench: pd.DataFrame, method: str, n_aug: int, gpu: bool, methods: list[str] | None = None,
                gpu_stages: set[str] | None = None) -> dict[str, float]:
    """CPU- and GPU-hours of one table row: its own jobs, its share of the jobs it shares, one training run.

    A job serves units (method, class): a block job's classes are all its method's, so the method takes all of it; a
    shared job (the pool, the CLIP embeddings, a search block serving both retrieval modes) is divided among the table's
    `methods` that use it. GPU-seconds are each job's own (`gpu_seconds`: a group allocation counted once). Training is
    the mean over seeds of the runs at this n_aug (seeds are repeats for the error bar, not part of a method's price).
    """
    methods = methods or [method]
    gpu_s_all = gpu_seconds(bench, gpu_stages or GPU_STAGES) if gpu else pd.Series(0.0, index=bench.index)
    own = _own_rows(bench, method)
    cpu = bench.loc[own, "cpu_s"].sum()
    gpu_s = gpu_s_all[own].sum()
    if _family(method) == "generated" and method_of(method).personalized:
        shared = personalisation_row(method)  # divided among the table's rows that read it
        users = sum(personalisation_row(m) == shared for m in methods) or 1
        rows = (bench["stage"] == "personalize") & bench["key"].str.startswith(f"{shared}/")
        cpu += bench.loc[rows, "cpu_s"].sum() / users
        gpu_s += gpu_s_all[rows].sum() / users
    for stage in _shared_stages(method):
        users = sum(stage in _shared_stages(m) for m in methods) or 1
        rows = bench["stage"] == stage
        cpu += bench.loc[rows, "cpu_s"].sum() / users
        gpu_s += gpu_s_all[rows].sum() / users
    runs = (bench["stage"] == "train") & bench["key"].str.startswith(f"{method}/{n_aug}/")
    if runs.any():
        cpu += bench.loc[runs, "cpu_s"].mean()
        gpu_s += gpu_s_all[runs].mean()
    return {"cpu_hours": cpu / 3600, "gpu_hours": gpu_s / 3600}


def add_cost(table: pd.DataFrame, bench: pd.DataFrame, gpu: bool, gpu_stages: set[str] | None = None) -> pd.DataFrame:
    """Add cpu_hours, gpu_hours, cost_hours (GPU-hours when GPU rules ran on GPUs, else CPU-hours) and
    gain_per_hour: top-1 points gained over `real` per hour of that cost."""
    table = table.copy()
    methods = list(dict.fromkeys(table["method"]))
    costs = [method_cost(bench, r.method, int(r.n_aug), gpu, methods, gpu_stages) for r in table.itertuples(index=False)]
    table["cpu_hours"] = [c["cpu_hours"] for c in costs]
    table["gpu_hours"] = [c["gpu_hours"] for c in costs]
    table["cost_hours"] = table["gpu_hours"] if gpu else table["cpu_hours"]
    real = table.loc[table["method"] == "real", "top1_mean"]
    gain = 100 * (table["top1_mean"] - (real.iloc[0] if len(real) else np.nan))
    table["gain_per_hour"] = np.where(table["cost_hours"] > 0, gain / table["cost_hours"].where(table["cost_hours"] > 0), np.nan)
    return table


def stage_costs(bench: pd.DataFrame, gpu: bool, gpu_stages: set[str] | None = None) -> pd.DataFrame:
    """Hours per stage over the whole run (each job once, a group allocation once): where the compute went."""
    bench = bench.assign(gpu_s=gpu_seconds(bench, gpu_stages or GPU_STAGES) if gpu else 0.0)
    g = bench.groupby("stage")
    out = pd.DataFrame({"jobs": g.size(), "cpu_hours": g["cpu_s"].sum() / 3600, "wall_hours": g["wall_s"].sum() / 3600,
                        "gpu_hours": g["gpu_s"].sum() / 3600})
    return out.reset_index().sort_values("cpu_hours", ascending=False)


def plot_accuracy_vs_naug(table: pd.DataFrame, out: Path) -> None:
    """accuracy_vs_naug.png: top-1 against augmentation images per class, one line per method, std as error bars.

    Baselines have no n_aug: they are drawn as horizontal lines (mean) with a band (± std).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    aug = table[~table["method"].isin(BASELINES)]
    xs = sorted(aug["n_aug"].unique()) or [0, 1]
    for i, (method, g) in enumerate(aug.groupby("method", sort=False)):
        g = g.sort_values("n_aug")
        # each point at the images per class actually trained on (the median over classes), not the nominal n_aug
        ax.errorbar(g["n_aug_median"], 100 * g["top1_mean"], yerr=100 * g["top1_std"].fillna(0), marker="o", capsize=3, label=method,
                    linestyle="-" if _family(method) == "retrieval" else "--", color=plt.cm.tab20(i % 20))
    for method, style in (("real", "k"), ("real_x2", "0.5")):
        row = table[table["method"] == method]
        if len(row):
            m, s = 100 * row["top1_mean"].iloc[0], 100 * np.nan_to_num(row["top1_std"].iloc[0])
            ax.axhline(m, color=style, linestyle=":", label=f"{method} (no augmentation)")
            ax.axhspan(m - s, m + s, color=style, alpha=0.08)
    if len(xs) > 1 and min(xs) > 0:
        ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("augmentation images per class (achieved median; ticks: nominal n_aug)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("Top-1 vs. number of added images (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


def _tile(img: Image.Image, size: int) -> Image.Image:
    return img.convert("RGB").resize((size, size), Image.Resampling.NEAREST if img.width < size else Image.Resampling.BILINEAR)


def _grid_image(data: bytes | Path, name: str | None = None) -> Image.Image:
    """An image for a grid through the workflow's one decoder; an undecodable one is a grey tile (already counted by
    the jobs that skipped it), a missing one an error."""
    try:
        return open_rgb(data if isinstance(data, bytes) else str(data), name)
    except UndecodableImage as exc:
        log.warning("report: grid shows a grey tile for %s", exc)
        return Image.new("RGB", (8, 8), (128, 128, 128))


def image_grid(method: str, real: pd.DataFrame, root: Path, manifest: Path, classes: list[tuple[str, str]],
               n_images: int, out: Path, tile: int = 64) -> None:
    """grids/<method>.png: one row per class, its real training images on the left, the method's images on the right."""
    from PIL import ImageDraw

    m = pd.read_parquet(manifest)
    shown = {key for key, _ in classes}
    m = m[(m["rank"] < n_images) & m["class"].isin(shown)].assign(key=lambda d: d["key"].astype(str)).reset_index(drop=True)
    # read by pointer: only the shown images, never a scan of the set
    added = {m["key"].iloc[i]: _grid_image(data, f"{manifest}:{m['key'].iloc[i]}") for i, data in read_pointed(m, Path(manifest).parent)}
    label_w, pad, head = 110, 4, 18
    width = label_w + 2 * n_images * (tile + pad) + 3 * pad
    canvas = Image.new("RGB", (width, head + len(classes) * (tile + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((label_w, 3), "real training images", fill="black")
    draw.text((label_w + n_images * (tile + pad) + 2 * pad, 3), f"{method}", fill="black")
    for row, (key, name) in enumerate(classes):
        y = head + row * (tile + pad)
        draw.text((pad, y + tile // 2 - 6), name[:18], fill="black")
        paths = real.loc[real["class"] == key, "path"].head(n_images)
        for j, p in enumerate(paths):
            canvas.paste(_tile(_grid_image(root / p), tile), (label_w + j * (tile + pad), y))
        keys = m[m["class"] == key].sort_values("rank")["key"]
        for j, k in enumerate(keys):
            if k in added:
                canvas.paste(_tile(added[k], tile), (label_w + (n_images + j) * (tile + pad) + 2 * pad, y))
    with atomic_path(out) as tmp:
        canvas.save(tmp)


def to_html(table: pd.DataFrame) -> str:
    """The results table as a small standalone HTML page (shown inside the Snakemake report)."""
    shown = table.copy()
    for col in ("top1_mean", "top1_std", "top5_mean"):
        shown[col] = (100 * shown[col]).round(1)
    body = shown.to_html(index=False, na_rep="", float_format=lambda v: f"{v:.4g}", border=0, classes="results")
    style = "table{border-collapse:collapse;font:13px sans-serif}td,th{padding:3px 8px;border-bottom:1px solid #ddd;text-align:right}"
    return f"<!doctype html><html><head><meta charset='utf-8'><style>{style}</style></head><body>" \
           f"<p>top-1/top-5 in %, mean (and std) over seeds; cost in hours.</p>{body}</body></html>\n"


def retrieval_precision(manifest: Path, n_aug: int, truth: pd.DataFrame) -> float:
    """Share of the first `n_aug` images per class whose hidden true label equals the class label."""
    m = pd.read_parquet(manifest)
    m = m[m["rank"] < n_aug].assign(key=lambda d: d["key"].astype(str))
    true = m["key"].map(dict(zip(truth["key"].astype(str), truth["true_label"], strict=True)))
    if true.isna().any():
        raise ValueError(f"{manifest}: {int(true.isna().sum())} keys not found in the pool's true labels")
    return float((true.to_numpy() == m["label"].to_numpy()).mean()) if len(m) else float("nan")


def achieved(manifest: Path, n_aug: int, n_classes: int) -> tuple[int, float]:
    """(min, median) over classes of the images a run with this nominal n_aug actually trains on (rank < n_aug).

    Retrieval can fall short of n_aug (dead links, a class with few good neighbours): the table shows it
    beside the nominal value, and the plot puts each point at the achieved median.
    """
    m = pd.read_parquet(manifest, columns=["label", "rank"])
    per_class = m[m["rank"] < n_aug].groupby("label").size().reindex(range(n_classes), fill_value=0)
    return int(per_class.min()), float(per_class.median())


def leaked_removed(files: dict[str, Path]) -> int:
    """Copies of val/test images removed from a retrieval method: confirmed by the merge (local pixels) plus those
    confirmed by fetch on the downloaded pixels (a precomputed pool's merge only nominates them)."""
    merged = int(json.loads(Path(files["stats"]).read_text())["leaked_removed"])
    fetched = json.loads(Path(files["fetch_stats"]).read_text()).get("leaked_removed", 0) if files.get("fetch_stats") else 0
    return merged + int(fetched)


YIELD_COLUMNS = ["method", "n_aug", "class", "achieved", "missing", "reasons", "leaked_merge", "leaked_fetch"]


def yield_table(points: list[tuple[str, int]], manifests: dict[str, Path], retrieval: dict[str, dict[str, Path]],
                classes: list[str], filters: dict[str, Path] | None = None) -> pd.DataFrame:
    """Every (method, n_aug, class) that trains on fewer than n_aug added images, with why.

    The achieved count is read from the method's manifest (the images a run with that n_aug trains on); the reasons are
    fetch's per-class counts (dead links by HTTP status, timeouts, content_changed, leaked, duplicate_image, conflict,
    candidates_exhausted = the shortfall once every candidate was looked at) and the merge's per-class removals.
    A generated method that falls short (it should not) is listed with the reason `not_generated`; a filtered row's
    class with the candidates its filter dropped (`filtered_out`, from its filter.json).
    """
    filters = filters or {}
    rows = []
    for method, n_aug in points:
        if method not in manifests or not n_aug:
            continue
        m = pd.read_parquet(manifests[method], columns=["label", "rank"])
        got = m[m["rank"] < n_aug].groupby("label").size().reindex(range(len(classes)), fill_value=0)
        fetch_stats, merge_stats = {}, {}
        if method in retrieval:
            if retrieval[method].get("fetch_stats"):
                fetch_stats = json.loads(Path(retrieval[method]["fetch_stats"]).read_text())
            merge_stats = json.loads(Path(retrieval[method]["stats"]).read_text()).get("per_class", {})
        for label, n in got.items():
            if n >= n_aug:
                continue
            cls = classes[int(label)]
            why = dict(fetch_stats.get("per_class_reasons", {}).get(cls, {})) if method in retrieval else {}
            if method in filters:
                got_filter = json.loads(Path(filters[method]).read_text())["per_class"].get(cls, {})
                broken = int(got_filter.get("undecodable", 0))
                why["filtered_out"] = int(got_filter.get("candidates", 0) - got_filter.get("passed", 0)) - broken
                if broken:
                    why["undecodable"] = broken
            elif method in retrieval:
                why["candidates_exhausted"] = int(n_aug - n)  # at this n_aug (fetch's own count is at the largest)
            else:
                why["not_generated"] = n_aug - int(n)
            rows.append({"method": method, "n_aug": int(n_aug), "class": cls, "achieved": int(n), "missing": int(n_aug - n),
                         "reasons": "; ".join(f"{r} {c}" for r, c in sorted(why.items(), key=lambda rc: -rc[1])),
                         "leaked_merge": int(merge_stats.get(cls, {}).get("leaked_removed", 0)),
                         "leaked_fetch": int(fetch_stats.get("leaked_per_class", {}).get(cls, 0))})
    return pd.DataFrame(rows, columns=YIELD_COLUMNS)


def yield_note(yields: pd.DataFrame) -> list[str]:
    """One line under the table per (method, n_aug) that fell short: how many classes, the lowest count, the top reasons."""
    if yields.empty:
        return ["Yield: every class of every method reached its n_aug (report/yield.csv is empty)."]
    lines = []
    for (method, n_aug), g in yields.groupby(["method", "n_aug"], sort=False):
        reasons: dict[str, int] = {}
        for text in g["reasons"]:
            for part in filter(None, text.split("; ")):
                r, c = part.rsplit(" ", 1)
                reasons[r] = reasons.get(r, 0) + int(c)
        top = ", ".join(f"{r} {c}" for r, c in sorted(reasons.items(), key=lambda rc: -rc[1])[:4])
        lines.append(f"Yield: {method} n_aug {n_aug}: {len(g)} class(es) short (lowest {int(g['achieved'].min())}); {top} "
                     f"(per class in yield.csv).")
    return lines


def filter_note(filters: dict[str, Path]) -> list[str]:
    """One line under the table per filtered row: how many candidates its filter kept, and the score it kept."""
    lines = []
    for row, path in filters.items():
        f = json.loads(Path(path).read_text())
        per = f["per_class"].values()
        kept_score = np.nanmean([v["mean_score_kept"] for v in per]) if f["kept"] else float("nan")
        all_score = np.nanmean([v["mean_score_all"] for v in per]) if f["candidates"] else float("nan")
        how = (f"score >= {f['filter']['threshold']}" if f["filter"]["threshold"] is not None else
               f"top {f['filter']['top_fraction']:.0%}" if f["filter"]["top_fraction"] is not None else "assigned to its class")
        lines.append(f"Filter: {row}: {f['filter']['score']} {how}: kept {f['kept']} of {f['candidates']} candidates "
                     f"(yield {f['yield']:.0%}; mean score {kept_score:.3f} kept, {all_score:.3f} all); "
                     f"{f['classes_short']} class(es) short of n_aug {f['n_aug']}.")
    return lines


def build_table(runs: list[dict[str, object]], retrieval: dict[str, dict[str, Path]], truth: pd.DataFrame | None,
                fidelity: dict[str, Path] | None = None, manifests: dict[str, Path] | None = None,
                n_classes: int | None = None, judged: dict[str, Path] | None = None,
                generators: dict[str, tuple[str, float]] | None = None,
                image_stats: dict[str, Path] | None = None) -> pd.DataFrame:
    """Aggregate runs [{method, n_aug, seed, metrics}] into the results table; `generators` gives a generated row's
    (generator, guidance scale), the columns that make the generator an axis of the table."""
    records = []
    for r in runs:
        metrics = read_metrics(r["metrics"])
        records.append({"method": r["method"], "n_aug": int(r["n_aug"]), "seed": int(r["seed"]),
                        "top1": metrics["top1"], "top5": metrics["top5"],
                        # undecodable images each run skipped, per split: a run on fewer images says so in the table
                        **{f"skipped_{k}": int(metrics.get("skipped", {}).get(k, 0)) for k in ("train", "aug", "test")}})
    df = pd.DataFrame(records)
    rows = []
    for (method, n_aug), g in df.groupby(["method", "n_aug"], sort=False):
        low, median = (achieved(manifests[method], n_aug, n_classes) if manifests and method in manifests and n_classes
                       else (n_aug, float(n_aug)))
        gen, guidance = (generators or {}).get(method, ("", float("nan")))
        row = {"method": method, "generator": gen, "guidance": guidance, "n_aug": n_aug, "n_aug_min": low,
               "n_aug_median": median, "seeds": len(g), "top1_mean": g["top1"].mean(),
               "top1_std": g["top1"].std(ddof=1) if len(g) > 1 else float("nan"), "top5_mean": g["top5"].mean(),
               "retrieval_precision": float("nan"), "leaked_removed": float("nan"), "generation_fidelity": float("nan"),
               "judge_fidelity": float("nan"), "diversity": float("nan"), "kid_real": float("nan"),
               **{f"skipped_{k}": int(g[f"skipped_{k}"].max()) for k in ("train", "aug", "test")}}
        if method in retrieval:
            files = retrieval[method]
            row["leaked_removed"] = leaked_removed(files)
            if truth is not None:
                row["retrieval_precision"] = retrieval_precision(files["manifest"], n_aug, truth)
        if fidelity and method in fidelity:
            row["generation_fidelity"] = json.loads(Path(fidelity[method]).read_text())["generation_fidelity"]
        if image_stats and method in image_stats:  # the set at the largest n_aug: one figure per row
            stats = json.loads(Path(image_stats[method]).read_text())
            row["diversity"], row["kid_real"] = stats["diversity"], stats["kid"]
        if judged and method in judged:
            row["judge_fidelity"] = json.loads(Path(judged[method]).read_text())["judge_fidelity"]
        rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS)


def judge_note(judged: dict[str, Path], pool: Path | None = None) -> list[str]:
    """The line under the table that says what the judge learnt from and how good it is: its top-1 on the test
    split and, in the toy world (`pool`: its score on held-out pool images of target kinds), on pool images."""
    if not judged:
        return []
    first = json.loads(Path(next(iter(judged.values()))).read_text())
    if pool is None:
        return [f"Judge: the classifier recipe trained on train + train_extra + val (no CLIP, no generator); "
                f"its test top-1 is {100 * first['judge_test_top1']:.1f} %."]
    held = json.loads(Path(pool).read_text())
    return [f"Judge: the classifier recipe trained on train + train_extra + val and pool images labelled with their hidden "
            f"true kind (toy world; {first.get('judge_train_images', '?')} images, no CLIP, no generator); its test top-1 is "
            f"{100 * first['judge_test_top1']:.1f} %, its accuracy on {held['images']} held-out pool images of target kinds "
            f"{100 * held['judge_fidelity']:.1f} %."]


def to_markdown(table: pd.DataFrame, notes: list[str] | None = None) -> str:
    """A readable markdown table: top-1 as mean ± std in percent, cost in hours; `notes` are lines under it."""
    lines = ["| method | n_aug | achieved (min / median) | seeds | top-1 (%) | top-5 (%) | retrieval precision | leaked removed "
             "| generation fidelity (CLIP / judge) | diversity / KID | cost (h) | gain / h |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in table.itertuples(index=False):
        std = "" if np.isnan(r.top1_std) else f" ± {100 * r.top1_std:.1f}"
        prec = "" if np.isnan(r.retrieval_precision) else f"{r.retrieval_precision:.3f}"
        leak = "" if np.isnan(r.leaked_removed) else f"{int(r.leaked_removed)}"
        fid = "" if np.isnan(r.generation_fidelity) else f"{r.generation_fidelity:.3f}"
        judge = getattr(r, "judge_fidelity", np.nan)
        fid += "" if np.isnan(judge) else f" / {judge:.3f}"
        top = f"{100 * r.top1_mean:.1f}{std} | {100 * r.top5_mean:.1f}"
        cost = getattr(r, "cost_hours", np.nan)
        gain = getattr(r, "gain_per_hour", np.nan)
        price = f"{'' if np.isnan(cost) else f'{cost:.3f}'} | {'' if np.isnan(gain) else f'{gain:.1f}'}"
        got = f"{r.n_aug_min} / {r.n_aug_median:g}" if r.n_aug else ""
        div, kid_real = getattr(r, "diversity", np.nan), getattr(r, "kid_real", np.nan)
        stats = f"{'' if np.isnan(div) else f'{div:.3f}'} / {'' if np.isnan(kid_real) else f'{kid_real:.4f}'}"
        stats = "" if stats == " / " else stats
        lines.append(f"| {r.method} | {r.n_aug} | {got} | {r.seeds} | {top} | {prec} | {leak} | {fid} | {stats} | {price} |")
    skipped = [c for c in ("skipped_train", "skipped_aug", "skipped_test") if c in table and table[c].fillna(0).sum()]
    if skipped:  # a run that trained or was tested on fewer images says so here, not only in a log
        lines.append("")
        lines.append("Undecodable images skipped (per run): " + "; ".join(
            f"{r.method} n_aug {r.n_aug}: " + ", ".join(f"{c[8:]} {int(getattr(r, c))}" for c in skipped if getattr(r, c))
            for r in table.itertuples(index=False) if any(getattr(r, c) for c in skipped)))
    for note in notes or []:
        lines += ["", note]
    return "\n".join(lines) + "\n"


COST_COLUMNS = ["method", "generator", "guidance", "n_aug", "cpu_hours", "gpu_hours", "cost_hours", "gain_per_hour"]


def write_report(table: pd.DataFrame, out_csv: Path, out_md: Path, out_html: Path | None = None,
                 out_method_cost: Path | None = None, notes: list[str] | None = None) -> None:
    """Write results.csv (and .parquet), results.md, results.html and cost_by_method.csv atomically.

    results.csv holds results only, so two runs of the same inputs give the same bytes; the measured
    cost of each row (CPU time differs from run to run) goes to cost_by_method.csv, and both to the
    markdown and HTML tables.
    """
    with atomic_path(out_csv) as tmp:
        table[COLUMNS].to_csv(tmp, index=False, float_format="%.6g")
    if out_method_cost is not None and "cost_hours" in table:
        with atomic_path(out_method_cost) as tmp:
            table[COST_COLUMNS].to_csv(tmp, index=False, float_format="%.6g")
    with atomic_path(out_md) as tmp:
        tmp.write_text(to_markdown(table, notes))
    if out_html is not None:
        with atomic_path(out_html) as tmp:
            tmp.write_text(to_html(table))
    write_parquet(out_csv.with_suffix(".parquet"), table[COLUMNS])
