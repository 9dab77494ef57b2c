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
    params:
        args=personalize_args,
        model=SD_MODEL,
        root=lambda wildcards, input: Path(input.table).parents[1],
    threads: config["personalize"]["threads"]
    resources:
        gpu=1,
    conda:
        "../../envs/torch.yaml"
    shell:
        "python -m augbench personalize --model {params.model:q} --table {input.table:q} --root {params.root:q}"
        " {params.args} --out {output.folder:q} > {log:q} 2>&1"
