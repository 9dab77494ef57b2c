# The target dataset's split tables (path, label, class) and classes.json: rendered (toy) or read from a folder tree.
if TOY_TARGET:

    rule world:
        output:
            classes=f"{DATA}/classes.json",
            pool=f"{R}/world/pool/pool.parquet",
            splits=expand(f"{DATA}/target/{{split}}.parquet", split=SPLITS),
        log:
            f"{LOGS}/world.log",
        benchmark:
            f"{BENCH}/world.tsv"
        params:
            spec=stage_spec("world"),
            out=lambda wildcards, output: Path(output.classes).parent,
        conda:
            "../../envs/augbench.yaml"
        shell:
            "python -m augbench world --spec {params.spec:q} --out {params.out:q} > {log:q} 2>&1"

else:

    rule target:
        output:
            classes=f"{DATA}/classes.json",
            splits=expand(f"{DATA}/target/{{split}}.parquet", split=SPLITS),
        log:
            f"{LOGS}/target.log",
        benchmark:
            f"{BENCH}/target.tsv"
        params:
            spec=stage_spec("target"),
            out=lambda wildcards, output: Path(output.classes).parent,
        conda:
            "../../envs/augbench.yaml"
        shell:
            "python -m augbench target --spec {params.spec:q} --out {params.out:q} > {log:q} 2>&1"
