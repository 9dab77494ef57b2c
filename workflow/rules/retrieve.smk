# Retrieval: queries per mode, exact search as map (one job per block of pool parts) and reduce (one merge
# job per mode), then the retrieved images, from the local pool shards or downloaded by url. Input functions
# live in common.smk.


rule queries:
    input:
        unpack(lambda wc: clip_input() if wc.mode == "text" else {}),
        classes=f"{DATA}/classes.json",
        train_emb=f"{R}/embed/target/img_emb/train.npy",
        train_meta=f"{R}/embed/target/metadata/train.parquet",
    output:
        vectors=f"{R}/retrieve/{{mode}}/queries.npy",
        table=f"{R}/retrieve/{{mode}}/queries.parquet",
    log:
        f"{LOGS}/queries/{{mode}}.log",
    benchmark:
        f"{BENCH}/queries/{{mode}}.tsv"
    params:
        prompts=lambda wc: " ".join(shlex.quote(p) for p in config["retrieve"]["prompts"]) if wc.mode == "text" else "",
        model=CLIP_MODEL,
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 4000 * attempt,
        runtime=lambda wc, attempt: 30 * attempt,
    conda:
        "../../envs/augbench.yaml"
    shell:
        "python -m augbench queries --mode {wildcards.mode} --classes {input.classes:q} --train-emb {input.train_emb:q}"
        " --train-meta {input.train_meta:q} --model {params.model:q} --prompts {params.prompts} --out-vectors {output.vectors:q}"
        " --out-table {output.table:q} > {log:q} 2>&1"


# With retrieve.gpu the search and merge jobs ask for a GPU and are named search_block_gpu / retrieve_gpu, so that a
# profile routes them to the GPU partition by name (profiles/slurm does), as it routes every other GPU rule.
rule:
    name: "search_block_gpu" if GPU_SEARCH else "search_block"
    input:
        unpack(block_parts),
        queries=expand(f"{R}/retrieve/{{mode}}/queries.npy", mode=MODES),
        tables=expand(f"{R}/retrieve/{{mode}}/queries.parquet", mode=MODES),
    output:
        f"{R}/retrieve/search/{{block}}.npz",
    wildcard_constraints:
        block=r"\d{5}",
    log:
        f"{LOGS}/search/{{block}}.log",
    benchmark:
        f"{BENCH}/search/{{block}}.tsv"
    params:
        spec=stage_spec("search"),
        pool=lambda wc: pool_args(int(wc.block) * PARTS_PER_BLOCK, (int(wc.block) + 1) * PARTS_PER_BLOCK),
        modes=" ".join(MODES),
    threads: SEARCH_THREADS
    # tile size and device change no result: resources, which Snakemake does not compare, not params, which it does
    resources:
        gpu=1 if GPU_SEARCH else 0,
        tile_rows=config["retrieve"]["tile_rows"],
        search_device=DEVICE if GPU_SEARCH else "cpu",
        mem_mb=search_mem_mb,
        # the block's FLOP at the device's rate and one read of its rows (search_minutes), with margin
        runtime=lambda wc, attempt: int(20 + 1.5 * search_minutes(wc)) * attempt,
    conda:
        "../../envs/augbench.yaml"
    shell:
        "python -m augbench search {params.pool} --modes {params.modes} --queries {input.queries:q} --tables {input.tables:q}"
        " --tile-rows {resources.tile_rows} --device {resources.search_device} --out {output:q} --spec {params.spec:q} > {log:q} 2>&1"


rule:
    name: "retrieve_gpu" if GPU_SEARCH else "retrieve"
    input:
        unpack(retrieve_inputs),
    output:
        neighbors=f"{R}/retrieve/{{mode}}/neighbors.parquet",
        stats=f"{R}/retrieve/{{mode}}/stats.json",
    log:
        f"{LOGS}/retrieve/{{mode}}.log",
    benchmark:
        f"{BENCH}/retrieve/{{mode}}.tsv"
    params:
        spec=lambda wc: stage_spec("retrieve", mode=wc.mode),
        pool=pool_args(),
        eval_root=lambda wildcards, input: Path(input.eval_tables[0]).parents[1],
        shards=lambda wildcards, input: f"--pool-shards {' '.join(map(shlex.quote, input.shards))}" if input.shards else "",
    threads: SEARCH_THREADS
    resources:
        gpu=1 if GPU_SEARCH else 0,
        search_device=DEVICE if GPU_SEARCH else "cpu",
        # the merged top-k of one mode (each block's k x queries) plus one chunk of candidates (retrieve.merge's chunk_rows)
        # with their vectors, and the val + test vectors
        mem_mb=lambda wc, attempt: int((2000 + 65536 * pool_dim() * 8 / 1e6 + merge_topk_mb() + eval_rows() * pool_dim() * 4 / 1e6)
                                       * attempt),
        runtime=lambda wc, attempt: int(20 + leak_search_minutes()) * attempt,
    conda:
        "../../envs/augbench.yaml"
    shell:
        "python -m augbench retrieve --blocks {input.blocks:q} --table {input.table:q} {params.pool}"
        " --classes {input.classes:q} --eval-emb {input.eval_emb:q} --eval-meta {input.eval_meta:q}"
        " {params.shards} --eval-root {params.eval_root:q} --threads {threads} --device {resources.search_device}"
        " --out {output.neighbors:q} --out-stats {output.stats:q} --spec {params.spec:q} > {log:q} 2>&1"


if not POOL_SHARDS:

    # A remote pool's candidates are downloaded on a CPU node (img2dataset, no GPU), then checked where CLIP runs.
    rule download_retrieved:
        input:
            neighbors=f"{R}/retrieve/{{mode}}/neighbors.parquet",
        output:
            f"{R}/retrieve/{{mode}}/downloads.parquet",
        log:
            f"{LOGS}/download_retrieved/{{mode}}.log",
        benchmark:
            f"{BENCH}/download_retrieved/{{mode}}.tsv"
        params:
            spec=stage_spec("download"),
        threads: config["fetch"]["threads"]
        resources:
            url_shard_size=config["fetch"]["shard_size"],  # changes no result: a resource, not a compared param
            i2d_threads=config["download"]["thread_count"],
            # img2dataset's processes and their threads; ~300 urls/s per process on a web pool
            mem_mb=lambda wc, attempt: int((1000 + 700 * config["fetch"]["threads"]) * attempt),
            runtime=lambda wc, attempt: int(30 + retrieved_candidates() / (300 * config["fetch"]["threads"]) / 60) * attempt,
        conda:
            "../../envs/augbench.yaml"
        shell:
            "python -m augbench download-retrieved --neighbors {input.neighbors:q} --cache {R}/retrieve/url_cache"
            " --download-spec {params.spec:q} --out {output:q} --threads {threads} --thread-count {resources.i2d_threads}"
            " --shard-size {resources.url_shard_size} > {log:q} 2>&1"


# fetch_retrieved (a local pool: the images are read from its shards, a CPU job) or check_retrieved (a remote pool with
# the content check: CLIP over every download, a GPU job on the embed rules' device, batch and precision). One of the
# two exists; they differ in where they run, so that a profile routes each by its name.
FETCH_SHELL = (
    "python -m augbench fetch --neighbors {input.neighbors:q} --classes {input.classes:q} {params.source} --n-aug {params.n_aug}"
    " --out-tar {output.tar:q} --out-manifest {output.manifest:q} --out-stats {output.stats:q}"
    " --spec {params.spec:q} --device {resources.device} --batch-size {resources.check_batch} > {log:q} 2>&1"
)

if CONTENT_CHECK:

    rule check_retrieved:
        input:
            unpack(fetch_inputs),
        output:
            tar=f"{R}/augment/{{method}}/images.tar",
            manifest=f"{R}/augment/{{method}}/manifest.parquet",
            stats=f"{R}/augment/{{method}}/fetch_stats.json",
        wildcard_constraints:
            method=row_pattern(tuple(RETRIEVAL_MODES), filtered=False),
        log:
            f"{LOGS}/fetch/{{method}}.log",
        benchmark:
            f"{BENCH}/fetch/{{method}}.tsv"
        params:
            spec=stage_spec("fetch"),
            n_aug=lambda wc: candidates_of(wc.method),
            source=fetch_source,
        threads: 1
        resources:
            gpu=1,
            device=DEVICE,
            check_batch=config["embed"]["batch_size"],
            mem_mb=lambda wc, attempt: 6000 * attempt,
            runtime=lambda wc, attempt: int(30 + retrieved_candidates() / CHECK_IMAGES_PER_S / 60) * attempt,
        conda:
            "../../envs/augbench.yaml"
        shell:
            FETCH_SHELL

    # A filtered retrieval row's candidates (n_aug x its filter's over-fetch), under candidates/.
    use rule check_retrieved as check_retrieved_candidates with:
        output:
            tar=f"{R}/augment/{{method}}/candidates/images.tar",
            manifest=f"{R}/augment/{{method}}/candidates/manifest.parquet",
            stats=f"{R}/augment/{{method}}/candidates/fetch_stats.json",
        wildcard_constraints:
            method=row_pattern(tuple(RETRIEVAL_MODES), filtered=True),

else:

    rule fetch_retrieved:
        input:
            unpack(fetch_inputs),
        output:
            tar=f"{R}/augment/{{method}}/images.tar",
            manifest=f"{R}/augment/{{method}}/manifest.parquet",
            stats=f"{R}/augment/{{method}}/fetch_stats.json",
        wildcard_constraints:
            method=row_pattern(tuple(RETRIEVAL_MODES), filtered=False),
        log:
            f"{LOGS}/fetch/{{method}}.log",
        benchmark:
            f"{BENCH}/fetch/{{method}}.tsv"
        params:
            spec=stage_spec("fetch"),
            n_aug=lambda wc: candidates_of(wc.method),
            source=fetch_source,
        threads: 1
        resources:
            device="cpu",
            check_batch=config["embed"]["batch_size"],
            mem_mb=lambda wc, attempt: 2000 * attempt,
            runtime=lambda wc, attempt: 40 * attempt,
        conda:
            "../../envs/augbench.yaml"
        shell:
            FETCH_SHELL

    # A filtered retrieval row's candidates (n_aug x its filter's over-fetch), under candidates/.
    use rule fetch_retrieved as fetch_retrieved_candidates with:
        output:
            tar=f"{R}/augment/{{method}}/candidates/images.tar",
            manifest=f"{R}/augment/{{method}}/candidates/manifest.parquet",
            stats=f"{R}/augment/{{method}}/candidates/fetch_stats.json",
        wildcard_constraints:
            method=row_pattern(tuple(RETRIEVAL_MODES), filtered=True),
