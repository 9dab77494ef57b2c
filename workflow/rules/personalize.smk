# One job per (method, block of `class_block` classes): the model is loaded once and each class gets fresh copies of
# what it trains. Each class's result is kept in personalize/{method}/cache/{cls}/<content key>/ (the block folder
# links to it), so a killed block keeps the classes it finished.
rule personalize:
    input:
        unpack(personalize_inputs),
    output:
        folder=directory(f"{R}/personalize/{{method}}/block_{{block}}"),
    wildcard_constraints:
        method=row_pattern(PERSONALIZED, filtered=False),
        block=r"\d{4}",
    priority: 2  # on the critical path: scheduled before ready jobs of lower priority
    log:
        f"{LOGS}/personalize/{{method}}/block_{{block}}.log",
    benchmark:
        f"{BENCH}/personalize/{{method}}/block_{{block}}.tsv"
    # The spec is a param of its own, a function of the wildcards only: Snakemake records such params and reruns
    # the job when they change, but not params computed from the job's input (as `args` is).
    params:
        spec=method_spec("personalize"),
        args=personalize_args,
        model=lambda wc: generator_of(wc.method)["model"],
        root=lambda wildcards, input: Path(input.table).parents[1],
    threads: config["personalize"]["threads"]
    resources:
        gpu=1,
        device=DEVICE,  # where the job may run (config `device`): placement, not a compared param
        mem_mb=block_mem_mb,
        runtime=personalize_runtime,  # minutes, from the work and the GPU rates in augbench.plan
    conda:
        "../../envs/augbench.yaml"
    shell:
        "python -m augbench personalize --model {params.model:q} --table {input.table:q} --root {params.root:q}"
        " --classes {input.classes:q} {params.args} --spec {params.spec:q} --out {output.folder:q} --threads {threads} --device {resources.device} > {log:q} 2>&1"
