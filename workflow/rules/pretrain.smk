rule pretrain_clip:
    input:
        shards=expand(f"{R}/pool/shards/{{part}}.tar", part=PARTS),
    output:
        model=directory(f"{R}/clip/model"),
    priority: 10  # on the critical path: scheduled before ready jobs of lower priority
    log:
        f"{LOGS}/pretrain_clip.log",
    benchmark:
        f"{BENCH}/pretrain_clip.tsv"
    params:
        spec=stage_spec("pretrain_clip"),
    threads: config["clip"]["train"].get("threads", 2)  # scheduling: not in the spec
    resources:
        gpu=1,
        device=DEVICE,  # where the job may run (config `device`): placement, not a compared param
    conda:
        "../../envs/augbench.yaml"
    shell:
        "python -m augbench pretrain-clip --shards {input.shards:q} --out {output.model:q}"
        " --spec {params.spec:q} --threads {threads} --device {resources.device} > {log:q} 2>&1"


rule pretrain_diffusion:
    input:
        unpack(lambda wc: clip_input()),
        shards=expand(f"{R}/pool/shards/{{part}}.tar", part=PARTS),
        classes=f"{DATA}/classes.json",  # class names of the fidelity learning curve (diffusion.train.eval_every)
    output:
        model=directory(f"{R}/diffusion/model"),
    priority: 10  # on the critical path: scheduled before ready jobs of lower priority
    log:
        f"{LOGS}/pretrain_diffusion.log",
    benchmark:
        f"{BENCH}/pretrain_diffusion.tsv"
    params:
        spec=stage_spec("pretrain_diffusion"),
        clip=CLIP_MODEL,
    # One thread by default: a second thread speeds a UNet step up only 1.4x (VAE 1.6x) on 2 cores, while the
    # classifier runs of real and retrieval rows, which need no diffusion model, can use the other core.
    threads: config["diffusion"]["train"].get("threads", 1)  # scheduling: not in the spec
    resources:
        gpu=1,
        device=DEVICE,  # where the job may run (config `device`): placement, not a compared param
    conda:
        "../../envs/augbench.yaml"
    shell:
        "python -m augbench pretrain-diffusion --shards {input.shards:q} --clip {params.clip:q} --classes {input.classes:q} --out {output.model:q}"
        " --spec {params.spec:q} --threads {threads} --device {resources.device} > {log:q} 2>&1"
