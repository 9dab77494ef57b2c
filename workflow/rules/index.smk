rule index:
    input:
        emb=POOL_EMB,
        meta=POOL_META,
    output:
        index=f"{R}/index/pool.index",
        ids=f"{R}/index/ids.parquet",
        infos=f"{R}/index/index_infos.json",
    log:
        f"{LOGS}/index.log",
    benchmark:
        f"{BENCH}/index.tsv"
    params:
        spec=stage_spec("index"),
    # FAISS follows OMP_NUM_THREADS, which Snakemake sets to this. One by default: in the demo a 2-thread index
    # job waited 8 minutes for pretrain_diffusion (1 thread) to free the second core, and every retrieval row
    # waited on it; the real config asks for more (config/imagenet10.yaml).
    threads: config["index"]["threads"]
    conda:
        "../../envs/faiss.yaml"
    shell:
        "python -m augbench index --emb {input.emb:q} --meta {input.meta:q} --out-index {output.index:q}"
        " --out-ids {output.ids:q} --out-infos {output.infos:q} --spec {params.spec:q} > {log:q} 2>&1"
