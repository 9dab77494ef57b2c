rule train:
    input:
        unpack(augment_inputs),
        real=real_splits,
        test=f"{DATA}/target/test.parquet",
        classes=f"{DATA}/classes.json",
    output:
        metrics=f"{R}/train/{{method}}/{{n_aug}}/{{seed}}/metrics.json",
        ckpt=f"{R}/train/{{method}}/{{n_aug}}/{{seed}}/model.pt",
    log:
        f"{LOGS}/train/{{method}}/{{n_aug}}/{{seed}}.log",
    benchmark:
        f"{BENCH}/train/{{method}}/{{n_aug}}/{{seed}}.tsv"
    params:
        spec=stage_spec("train"),
        root=lambda wildcards, input: Path(input.test).parents[1],
        aug=lambda wc, input: (
            f"--aug-manifest {input.aug_manifest} --aug-tar {input.aug_tar}" if "aug_tar" in input.keys() else ""
        ),
    threads: config["train"]["threads"]
    resources:
        gpu=1,
        device=DEVICE,  # where the job may run (config `device`): placement, not a compared param
    conda:
        "../../envs/torch.yaml"
    shell:
        "python -m augbench train --real {input.real:q} --root {params.root:q} --test {input.test:q}"
        " --classes {input.classes:q} {params.aug} --n-aug {wildcards.n_aug} --seed {wildcards.seed}"
        " --out-metrics {output.metrics:q} --out-ckpt {output.ckpt:q} --spec {params.spec:q} --threads {threads} --device {resources.device} > {log:q} 2>&1"
