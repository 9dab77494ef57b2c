rule retrieve:
    input:
        unpack(lambda wc: clip_input()),
        index=f"{R}/index/pool.index",
        ids=f"{R}/index/ids.parquet",
        pool_emb=POOL_EMB,
        classes=f"{R}/world/classes.json",
        train_emb=f"{R}/embed/target/img_emb/train.npy",
        train_meta=f"{R}/embed/target/metadata/train.parquet",
        eval_emb=expand(f"{R}/embed/target/img_emb/{{split}}.npy", split=["val", "test"]),
        eval_meta=expand(f"{R}/embed/target/metadata/{{split}}.parquet", split=["val", "test"]),
        eval_tables=expand(f"{R}/world/target/{{split}}.parquet", split=["val", "test"]),
        shards=POOL_SHARDS,
    output:
        neighbors=f"{R}/retrieve/{{mode}}/neighbors.parquet",
        stats=f"{R}/retrieve/{{mode}}/stats.json",
    log:
        f"{LOGS}/retrieve/{{mode}}.log",
    benchmark:
        f"{BENCH}/retrieve/{{mode}}.tsv"
    params:
        spec=lambda wc: stage_spec("retrieve", mode=wc.mode),
        model=CLIP_MODEL,
        eval_root=lambda wildcards, input: Path(input.eval_tables[0]).parents[1],
        shards=lambda wildcards, input: f"--pool-shards {' '.join(map(shlex.quote, input.shards))}" if input.shards else "",
    conda:
        "../../envs/faiss.yaml"
    shell:
        "python -m augbench retrieve --index {input.index:q} --ids {input.ids:q} --pool-emb {input.pool_emb:q}"
        " --classes {input.classes:q} --train-emb {input.train_emb:q} --train-meta {input.train_meta:q}"
        " --eval-emb {input.eval_emb:q} --eval-meta {input.eval_meta:q} --model {params.model:q}"
        " {params.shards} --eval-root {params.eval_root:q}"
        " --out {output.neighbors:q} --out-stats {output.stats:q} --spec {params.spec:q} > {log:q} 2>&1"


rule fetch_retrieved:
    input:
        neighbors=lambda wc: f"{R}/retrieve/{RETRIEVAL_MODES[wc.method]}/neighbors.parquet",
        shards=POOL_SHARDS,
    output:
        tar=f"{R}/augment/{{method}}/images.tar",
        manifest=f"{R}/augment/{{method}}/manifest.parquet",
    wildcard_constraints:
        method="|".join(RETRIEVAL_MODES),
    log:
        f"{LOGS}/fetch/{{method}}.log",
    benchmark:
        f"{BENCH}/fetch/{{method}}.tsv"
    params:
        # without local shards the retrieved urls are downloaded; attempts are kept in the cache for resuming
        source=lambda wc, input: (
            f"--shards {' '.join(map(shlex.quote, input.shards))}" if input.shards
            else f"--cache {R}/augment/{wc.method}/cache --spec {shlex.quote(stage_spec('download'))}"
        ),
    conda:
        "../../envs/download.yaml"
    shell:
        "python -m augbench fetch --neighbors {input.neighbors:q} {params.source}"
        " --out-tar {output.tar:q} --out-manifest {output.manifest:q} > {log:q} 2>&1"
