# One job per (method, class): a cluster profile can group them, or run them as arrays.
rule personalize:
    input:
        unpack(personalize_inputs),
    output:
        folder=directory(f"{R}/personalize/{{method}}/{{cls}}"),
    wildcard_constraints:
        method="|".join(PERSONALIZED),
    priority: 2  # on the critical path: scheduled before ready jobs of lower priority
    log:
        f"{LOGS}/personalize/{{method}}/{{cls}}.log",
    benchmark:
        f"{BENCH}/personalize/{{method}}/{{cls}}.tsv"
    # The spec is a param of its own, a function of the wildcards only: Snakemake records such params and reruns
    # the job when they change, but not params computed from the job's input (as `args` is).
    params:
        spec=method_spec("personalize"),
        args=personalize_args,
        model=SD_MODEL,
        root=lambda wildcards, input: Path(input.table).parents[1],
    threads: config["personalize"]["threads"]
    resources:
        gpu=1,
        device=DEVICE,  # where the job may run (config `device`): placement, not a compared param
    conda:
        "../../envs/torch.yaml"
    shell:
        "python -m augbench personalize --model {params.model:q} --table {input.table:q} --root {params.root:q}"
        " {params.args} --spec {params.spec:q} --out {output.folder:q} --threads {threads} --device {resources.device} > {log:q} 2>&1"
