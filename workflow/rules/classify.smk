# The decode cache: each split and each augmentation set decoded once, by a CPU job, into a uint8 array file at the
# classifier's load size (torchvision's Resize + CenterCrop geometry); every training run memory-maps it.
rule decode_split:
    input:
        table=f"{DATA}/target/{{split}}.parquet",
    output:
        directory(f"{R}/decoded/{{split}}"),
    wildcard_constraints:
        split="train|train_extra|val|test",
    log:
        f"{LOGS}/decode/{{split}}.log",
    benchmark:
        f"{BENCH}/decode/{{split}}.tsv"
    params:
        size=DECODE_SIZE,
        root=lambda wildcards, input: Path(input.table).parents[1],
    resources:
        mem_mb=2000,  # one image at a time into the memory-mapped file
    conda:
        "../../envs/augbench.yaml"
    shell:
        "python -m augbench decode --table {input.table:q} --root {params.root:q} --size {params.size} --out {output:q} > {log:q} 2>&1"


rule decode_augment:
    input:
        manifest=f"{R}/augment/{{method}}/manifest.parquet",
    output:
        directory(f"{R}/decoded/augment/{{method}}"),
    log:
        f"{LOGS}/decode/augment/{{method}}.log",
    benchmark:
        f"{BENCH}/decode/augment/{{method}}.tsv"
    params:
        size=DECODE_SIZE,
    resources:
        mem_mb=2000,
    conda:
        "../../envs/augbench.yaml"
    shell:
        "python -m augbench decode --manifest {input.manifest:q} --size {params.size} --out {output:q} > {log:q} 2>&1"


rule train:
    input:
        unpack(augment_inputs),
        real=real_splits,
        test=f"{R}/decoded/test",
        classes=f"{DATA}/classes.json",
    output:
        metrics=f"{R}/train/{{method}}/{{n_aug}}/{{seed}}/metrics.json",
        ckpt=f"{R}/train/{{method}}/{{n_aug}}/{{seed}}/model.pt",
    log:
        f"{LOGS}/train/{{method}}/{{n_aug}}/{{seed}}.log",
    benchmark:
        f"{BENCH}/train/{{method}}/{{n_aug}}/{{seed}}.tsv"
    params:
        spec=lambda wildcards: stage_spec("train", no_added_images=wildcards.method in BASELINES),  # no added images: no mixing
        aug=lambda wc, input: f"--aug-manifest {input.aug_manifest}" if "aug_manifest" in input.keys() else "",
    threads: config["train"]["threads"]
    resources:
        gpu=1,
        device=DEVICE,  # where the job may run (config `device`): placement, not a compared param
        mem_mb=train_mem_mb,
        runtime=train_runtime,  # minutes, from the work and the GPU rates in augbench.plan
    conda:
        "../../envs/augbench.yaml"
    shell:
        "python -m augbench train --real {input.real:q} --root . --test {input.test:q}"
        " --classes {input.classes:q} {params.aug} --n-aug {wildcards.n_aug} --seed {wildcards.seed}"
        " --out-metrics {output.metrics:q} --out-ckpt {output.ckpt:q} --spec {params.spec:q} --threads {threads} --device {resources.device} > {log:q} 2>&1"


# The judge (report.judge): the same recipe trained once on every labelled non-test image of the target, then used to
# score each generated method's images: a fidelity figure that shares no weights with CLIP or the generator. In the
# toy world it also learns pool images by their hidden true kind (the generator learnt from the pool), and its
# accuracy on held-out pool images is reported beside its fidelity figures.
rule judge_pool:
    input:
        pool=f"{R}/world/pool/pool.parquet",
        classes=f"{R}/world/classes.json",
    output:
        train=f"{R}/judge/pool/train.parquet",
        heldout=f"{R}/judge/pool/heldout.parquet",
    log:
        f"{LOGS}/judge/pool.log",
    params:
        world=lambda wildcards, input: Path(input.classes).parent,
        train=config["report"]["judge_pool_train"],
        heldout=config["report"]["judge_pool_heldout"],
    conda:
        "../../envs/augbench.yaml"
    shell:
        "python -m augbench judge-pool --world {params.world:q} --train-per-class {params.train} --heldout-per-class"
        " {params.heldout} --out-train {output.train:q} --out-heldout {output.heldout:q} > {log:q} 2>&1"


rule decode_judge_pool:
    input:
        table=f"{R}/judge/pool/{{part}}.parquet",
        world=f"{R}/world/classes.json",  # the images' paths are relative to the world folder
    output:
        directory(f"{R}/decoded/judge_pool/{{part}}"),
    wildcard_constraints:
        part="train|heldout",
    log:
        f"{LOGS}/decode/judge_pool/{{part}}.log",
    benchmark:
        f"{BENCH}/decode/judge_pool/{{part}}.tsv"
    params:
        size=DECODE_SIZE,
        root=lambda wildcards, input: Path(input.world).parent,
    resources:
        mem_mb=2000,
    conda:
        "../../envs/augbench.yaml"
    shell:
        "python -m augbench decode --table {input.table:q} --root {params.root:q} --size {params.size} --out {output:q} > {log:q} 2>&1"


rule judge_pool_accuracy:
    input:
        ckpt=f"{R}/judge/model.pt",
        judge_metrics=f"{R}/judge/metrics.json",
        images=f"{R}/decoded/judge_pool/heldout",
        classes=f"{DATA}/classes.json",
    output:
        f"{R}/judge/pool_heldout.json",
    log:
        f"{LOGS}/judge/pool_heldout.log",
    benchmark:
        f"{BENCH}/judge/pool_heldout.tsv"
    resources:
        device=DEVICE,
    conda:
        "../../envs/augbench.yaml"
    shell:
        "python -m augbench judge --ckpt {input.ckpt:q} --judge-metrics {input.judge_metrics:q} --images {input.images:q}"
        " --classes {input.classes:q} --out {output:q} --device {resources.device} > {log:q} 2>&1"


rule train_judge:
    input:
        real=[f"{R}/decoded/{s}" for s in ("train", "train_extra", "val")] + ([f"{R}/decoded/judge_pool/train"] if JUDGE_POOL else []),
        test=f"{R}/decoded/test",
        classes=f"{DATA}/classes.json",
    output:
        metrics=f"{R}/judge/metrics.json",
        ckpt=f"{R}/judge/model.pt",
    log:
        f"{LOGS}/judge/train.log",
    benchmark:
        f"{BENCH}/judge/train.tsv"
    params:
        spec=stage_spec("train", min_steps=config["report"]["judge_min_steps"], no_added_images=True),
    threads: config["train"]["threads"]
    resources:
        gpu=1,
        device=DEVICE,
    conda:
        "../../envs/augbench.yaml"
    shell:
        "python -m augbench train --real {input.real:q} --root . --test {input.test:q}"
        " --classes {input.classes:q} --seed 0 --out-metrics {output.metrics:q} --out-ckpt {output.ckpt:q}"
        " --spec {params.spec:q} --threads {threads} --device {resources.device} > {log:q} 2>&1"


rule judge_generated:
    input:
        ckpt=rules.train_judge.output.ckpt,
        judge_metrics=rules.train_judge.output.metrics,
        images=f"{R}/decoded/augment/{{method}}",  # the decode cache the training runs read: memory-mapped
        classes=f"{DATA}/classes.json",
    output:
        f"{R}/augment/{{method}}/judge.json",
    wildcard_constraints:
        method=row_pattern(GENERATION_METHODS),
    log:
        f"{LOGS}/judge/{{method}}.log",
    benchmark:
        f"{BENCH}/judge/{{method}}.tsv"
    resources:
        gpu=1,  # the judge (a ResNet-50 on ImageNet) classifies every generated image: a GPU job like collect_generated
        device=DEVICE,
    conda:
        "../../envs/augbench.yaml"
    shell:
        "python -m augbench judge --ckpt {input.ckpt:q} --judge-metrics {input.judge_metrics:q} --images {input.images:q}"
        " --classes {input.classes:q} --out {output:q} --device {resources.device} > {log:q} 2>&1"


# Beside fidelity: how diverse a row's images are within a class and how far they lie from the class's real images (KID),
# on CLIP image features of the decode caches the classifier reads, one class at a time (augbench.imagestats).
rule image_stats:
    input:
        unpack(lambda wc: clip_input()),
        images=f"{R}/decoded/augment/{{method}}",
        real=f"{R}/decoded/train",
    output:
        f"{R}/augment/{{method}}/image_stats.json",
    log:
        f"{LOGS}/image_stats/{{method}}.log",
    benchmark:
        f"{BENCH}/image_stats/{{method}}.tsv"
    params:
        clip=CLIP_MODEL,
    resources:
        gpu=1,  # CLIP over every added image, as collect_generated
        device=DEVICE,
    conda:
        "../../envs/augbench.yaml"
    shell:
        "python -m augbench image-stats --images {input.images:q} --real {input.real:q} --clip {params.clip:q}"
        " --out {output:q} --device {resources.device} > {log:q} 2>&1"
