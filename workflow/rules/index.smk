# The FAISS ANN index (retrieve.search: index, and `augbench query`): trained once on a sample, one job per
# part adds its rows, the inverted lists are merged on disk, searched memory-mapped.
INDEX_THREADS = config["index"]["threads"]
IPARTS = [f"{i:05d}" for i in range(len(POOL_EMB))]


rule index_train:
    input:
        emb=POOL_EMB,
        meta=POOL_META,
    output:
        f"{R}/index/trained.index",
    log:
        f"{LOGS}/index/train.log",
    benchmark:
        f"{BENCH}/index/train.tsv"
    params:
        spec=stage_spec("index"),
        pool=pool_args(),
    threads: INDEX_THREADS
    resources:
        mem_mb=lambda wc, attempt: int((1500 + config["index"]["train_size"] * pool_dim() * 4 * 3 / 1e6) * attempt),
        runtime=lambda wc, attempt: 120 * attempt,
    conda:
        "../../envs/augbench.yaml"
    shell:
        "python -m augbench index-train {params.pool} --out {output:q} --spec {params.spec:q} --threads {threads} > {log:q} 2>&1"


rule index_add:
    input:
        trained=f"{R}/index/trained.index",
        emb=lambda wc: POOL_EMB[int(wc.ipart)],
        meta=lambda wc: POOL_META[int(wc.ipart)],
    output:
        f"{R}/index/parts/{{ipart}}.index",
    wildcard_constraints:
        ipart=r"\d{5}",
    log:
        f"{LOGS}/index/add/{{ipart}}.log",
    params:
        pool=lambda wc: pool_args(int(wc.ipart), int(wc.ipart) + 1),
    threads: INDEX_THREADS
    resources:
        mem_mb=lambda wc, attempt: int((1500 + 131072 * pool_dim() * 6 / 1e6) * attempt),
        runtime=lambda wc, attempt: 60 * attempt,
    conda:
        "../../envs/augbench.yaml"
    shell:
        "python -m augbench index-add {params.pool} --trained {input.trained:q} --out {output:q} --threads {threads} > {log:q} 2>&1"


rule index_merge:
    input:
        trained=f"{R}/index/trained.index",
        parts=expand(f"{R}/index/parts/{{ipart}}.index", ipart=IPARTS),
    output:
        index=f"{R}/index/pool.index",
        ivfdata=f"{R}/index/pool.ivfdata",
    log:
        f"{LOGS}/index/merge.log",
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 4000 * attempt,
        runtime=lambda wc, attempt: 120 * attempt,
    conda:
        "../../envs/augbench.yaml"
    shell:
        "python -m augbench index-merge --trained {input.trained:q} --parts {input.parts:q} --out-index {output.index:q}"
        " --out-ivfdata {output.ivfdata:q} > {log:q} 2>&1"


rule index_recall:
    input:
        index=f"{R}/index/pool.index",
        ivfdata=f"{R}/index/pool.ivfdata",
        queries=expand(f"{R}/retrieve/{{mode}}/queries.npy", mode=MODES),
        emb=POOL_EMB,
        meta=POOL_META,
    output:
        f"{R}/index/index_infos.json",
    log:
        f"{LOGS}/index/recall.log",
    params:
        spec=stage_spec("index"),
        pool=pool_args(),
    threads: INDEX_THREADS
    resources:
        mem_mb=search_mem_mb,
        runtime=lambda wc, attempt: 120 * attempt,
    conda:
        "../../envs/augbench.yaml"
    shell:
        "python -m augbench index-recall --index {input.index:q} {params.pool} --queries {input.queries:q}"
        " --out {output:q} --spec {params.spec:q} --threads {threads} > {log:q} 2>&1"


rule index_search:
    input:
        index=f"{R}/index/pool.index",
        ivfdata=f"{R}/index/pool.ivfdata",
        infos=f"{R}/index/index_infos.json",  # the recall of what is searched is measured before it is used
        queries=f"{R}/retrieve/{{mode}}/queries.npy",
        tables=f"{R}/retrieve/{{mode}}/queries.parquet",
        emb=POOL_EMB,
        meta=POOL_META,
    output:
        f"{R}/index/search/{{mode}}.npz",
    log:
        f"{LOGS}/index/search_{{mode}}.log",
    params:
        spec=stage_spec("search"),
        pool=pool_args(),
        nprobe=config["index"]["nprobe"],
        refine=config["index"]["refine"],
    threads: INDEX_THREADS
    resources:
        mem_mb=search_mem_mb,
        runtime=lambda wc, attempt: 120 * attempt,
    conda:
        "../../envs/augbench.yaml"
    shell:
        "python -m augbench index-search --index {input.index:q} {params.pool} --modes {wildcards.mode} --queries {input.queries:q}"
        " --tables {input.tables:q} --nprobe {params.nprobe} --refine {params.refine} --out {output:q} --spec {params.spec:q} --threads {threads} > {log:q} 2>&1"
