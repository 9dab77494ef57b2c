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
        spec=lambda wc: stage_spec("personalize", method=wc.method),
        model=SD_MODEL,
        root=f"{R}/world",
        cls=class_args,
        emb=lambda wc, input: f"--emb {input.emb} --meta {input.meta}" if "emb" in input.keys() else "",
    threads: config["personalize"]["threads"]
    resources:
        gpu=1,
    conda:
        "../../envs/torch.yaml"
    shell:
        "python -m augbench personalize --model {params.model:q} --table {input.table:q} --root {params.root:q}"
        " {params.cls} {params.emb} --out {output.folder:q} --spec {params.spec:q} > {log:q} 2>&1"
