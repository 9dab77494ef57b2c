# The pool's images, downloaded part by part with img2dataset (not needed with precomputed embeddings).
if not PRECOMPUTED:

    rule pool_parts:
        input:
            pool=f"{R}/world/pool/pool.parquet" if TOY else config["pool"]["urls"],
        output:
            parts=expand(f"{R}/pool/parts/{{part}}.parquet", part=PARTS),
        priority: 10  # on the critical path: scheduled before ready jobs of lower priority
        log:
            f"{LOGS}/pool_parts.log",
        resources:
            mem_mb=lambda wc, attempt: 3000 * attempt,  # the url list is streamed in batches of 1M rows
            runtime=lambda wc, attempt: 60 * attempt,
        conda:
            "../../envs/augbench.yaml"
        shell:
            "python -m augbench parts --pool {input.pool:q} --out {output.parts:q} > {log:q} 2>&1"


    rule download:
        input:
            urls=f"{R}/pool/parts/{{part}}.parquet",
            pool=f"{R}/world/pool/pool.parquet" if TOY else [],
        output:
            tar=f"{R}/pool/shards/{{part}}.tar",
            status=f"{R}/pool/shards/{{part}}.parquet",
            stats=f"{R}/pool/shards/{{part}}_stats.json",
        priority: 10  # on the critical path: scheduled before ready jobs of lower priority
        log:
            f"{LOGS}/download/{{part}}.log",
        benchmark:
            f"{BENCH}/download/{{part}}.tsv"
        params:
            spec=stage_spec("download"),
            # The url cache lives outside the outputs so that a rerun asks only for the failed urls.
            cache=f"{R}/pool/cache/{{part}}",
            serve=f"--serve {R}/world" if TOY else "",
        threads: config["download"]["processes_count"]  # img2dataset processes: scheduling, not in the spec
        resources:
            i2d_threads=config["download"]["thread_count"],
            mem_mb=lambda wc, attempt: 4000 * attempt,
            runtime=lambda wc, attempt: 240 * attempt,
        conda:
            "../../envs/augbench.yaml"
        shell:
            "python -m augbench download --urls {input.urls:q} --out-tar {output.tar:q}"
            " --out-status {output.status:q} --out-stats {output.stats:q} --cache {params.cache:q}"
            " {params.serve} --spec {params.spec:q} --threads {threads} --thread-count {resources.i2d_threads} > {log:q} 2>&1"
