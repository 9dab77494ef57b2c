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


# The judge (report.judge): the same recipe trained once on every labelled non-test image of the target, then used to
# score each generated method's images: a fidelity figure that shares no weights with CLIP or the generator.
rule train_judge:
    input:
        real=[f"{DATA}/target/{s}.parquet" for s in ("train", "train_extra", "val")],
        test=f"{DATA}/target/test.parquet",
        classes=f"{DATA}/classes.json",
    output:
        metrics=f"{R}/judge/metrics.json",
        ckpt=f"{R}/judge/model.pt",
    log:
        f"{LOGS}/judge/train.log",
    benchmark:
        f"{BENCH}/judge/train.tsv"
    params:
        spec=stage_spec("train", min_steps=config["report"]["judge_min_steps"]),
        root=lambda wildcards, input: Path(input.test).parents[1],
    threads: config["train"]["threads"]
    resources:
        gpu=1,
        device=DEVICE,
    conda:
        "../../envs/torch.yaml"
    shell:
        "python -m augbench train --real {input.real:q} --root {params.root:q} --test {input.test:q}"
        " --classes {input.classes:q} --seed 0 --out-metrics {output.metrics:q} --out-ckpt {output.ckpt:q}"
        " --spec {params.spec:q} --threads {threads} --device {resources.device} > {log:q} 2>&1"


rule judge_generated:
    input:
        ckpt=rules.train_judge.output.ckpt,
        judge_metrics=rules.train_judge.output.metrics,
        manifest=f"{R}/augment/{{method}}/manifest.parquet",
        tar=f"{R}/augment/{{method}}/images.tar",
        classes=f"{DATA}/classes.json",
    output:
        f"{R}/augment/{{method}}/judge.json",
    wildcard_constraints:
        method="|".join(GENERATION_METHODS),
    log:
        f"{LOGS}/judge/{{method}}.log",
    benchmark:
        f"{BENCH}/judge/{{method}}.tsv"
    resources:
        device=DEVICE,
    conda:
        "../../envs/torch.yaml"
    shell:
        "python -m augbench judge --ckpt {input.ckpt:q} --judge-metrics {input.judge_metrics:q} --manifest {input.manifest:q}"
        " --tar {input.tar:q} --classes {input.classes:q} --out {output:q} --device {resources.device} > {log:q} 2>&1"
