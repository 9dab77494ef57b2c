rule world:
    output:
        classes=f"{R}/world/classes.json",
        pool=f"{R}/world/pool/pool.parquet",
        splits=expand(f"{R}/world/target/{{split}}.parquet", split=SPLITS),
    log:
        f"{LOGS}/world.log",
    benchmark:
        f"{BENCH}/world.tsv"
    params:
        spec=stage_spec("world"),
        out=lambda wildcards, output: Path(output.classes).parent,
    conda:
        "../../envs/torch.yaml"
    shell:
        "python -m augbench world --spec {params.spec:q} --out {params.out:q} > {log:q} 2>&1"
