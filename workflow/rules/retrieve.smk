rule retrieve:
    input:
        unpack(lambda wc: clip_input()),
        index=f"{R}/index/pool.index",
        ids=f"{R}/index/ids.parquet",
        pool_emb=expand(f"{R}/embed/pool/img_emb/{{part}}.npy", part=PARTS),
        classes=f"{R}/world/classes.json",
        train_emb=f"{R}/embed/target/img_emb/train.npy",
        train_meta=f"{R}/embed/target/metadata/train.parquet",
        eval_emb=expand(f"{R}/embed/target/img_emb/{{split}}.npy", split=["val", "test"]),
        eval_meta=expand(f"{R}/embed/target/metadata/{{split}}.parquet", split=["val", "test"]),
        eval_tables=expand(f"{R}/world/target/{{split}}.parquet", split=["val", "test"]),
        shards=expand(f"{R}/pool/shards/{{part}}.tar", part=PARTS),
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
    conda:
        "../../envs/faiss.yaml"
    shell:
        "python -m augbench retrieve --index {input.index:q} --ids {input.ids:q} --pool-emb {input.pool_emb:q}"
        " --classes {input.classes:q} --train-emb {input.train_emb:q} --train-meta {input.train_meta:q}"
        " --eval-emb {input.eval_emb:q} --eval-meta {input.eval_meta:q} --model {params.model:q}"
        " --pool-shards {input.shards:q} --eval-root {params.eval_root:q}"
        " --out {output.neighbors:q} --out-stats {output.stats:q} --spec {params.spec:q} > {log:q} 2>&1"


rule fetch_retrieved:
    input:
        neighbors=lambda wc: f"{R}/retrieve/{RETRIEVAL_MODES[wc.method]}/neighbors.parquet",
        shards=expand(f"{R}/pool/shards/{{part}}.tar", part=PARTS),
    output:
        tar=f"{R}/augment/{{method}}/images.tar",
        manifest=f"{R}/augment/{{method}}/manifest.parquet",
    wildcard_constraints:
        method="|".join(RETRIEVAL_MODES),
    log:
        f"{LOGS}/fetch/{{method}}.log",
    conda:
        "../../envs/download.yaml"
    shell:
        "python -m augbench fetch --neighbors {input.neighbors:q} --shards {input.shards:q}"
        " --out-tar {output.tar:q} --out-manifest {output.manifest:q} > {log:q} 2>&1"
