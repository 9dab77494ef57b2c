# CLIP embeddings in the clip-retrieval layout: pool shards (unless precomputed) and target splits.
if not PRECOMPUTED:

    rule embed_pool:
        input:
            unpack(lambda wc: clip_input()),
            shard=f"{R}/pool/shards/{{part}}.tar",
        output:
            emb=f"{R}/embed/pool/img_emb/img_emb_{{part}}.npy",  # clip-retrieval's naming
            meta=f"{R}/embed/pool/metadata/metadata_{{part}}.parquet",
        log:
            f"{LOGS}/embed/pool/{{part}}.log",
        benchmark:
            f"{BENCH}/embed/pool/{{part}}.tsv"
        params:
            spec=stage_spec("embed"),
            model=CLIP_MODEL,
        threads: 1
        resources:
            gpu=1,
            device=DEVICE,  # where the job may run (config `device`): placement, not a compared param
            mem_mb=lambda wc, attempt: 6000 * attempt,
            runtime=lambda wc, attempt: 120 * attempt,
        conda:
            "../../envs/augbench.yaml"
        shell:
            "python -m augbench embed --shard {input.shard:q} --model {params.model:q}"
            " --out-emb {output.emb:q} --out-meta {output.meta:q} --spec {params.spec:q} --threads {threads} --device {resources.device} > {log:q} 2>&1"


rule embed_target:
    input:
        unpack(lambda wc: clip_input()),
        split=f"{DATA}/target/{{split}}.parquet",
    output:
        emb=f"{R}/embed/target/img_emb/{{split}}.npy",
        meta=f"{R}/embed/target/metadata/{{split}}.parquet",
    log:
        f"{LOGS}/embed/target/{{split}}.log",
    benchmark:
        f"{BENCH}/embed/target/{{split}}.tsv"
    params:
        spec=stage_spec("embed"),
        model=CLIP_MODEL,
        root=lambda wildcards, input: Path(input.split).parents[1],
    threads: 1
    resources:
        device=DEVICE,
        mem_mb=lambda wc, attempt: 6000 * attempt,
        runtime=lambda wc, attempt: 120 * attempt,
    conda:
        "../../envs/augbench.yaml"
    shell:
        "python -m augbench embed --split {input.split:q} --root {params.root:q} --model {params.model:q}"
        " --out-emb {output.emb:q} --out-meta {output.meta:q} --spec {params.spec:q} --threads {threads} --device {resources.device} > {log:q} 2>&1"
