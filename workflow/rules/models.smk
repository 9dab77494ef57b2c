# Hub models named in the config (clip.model, diffusion.model as "org/name"), fetched once into the model cache at
# the configured revision. A local rule: it runs where Snakemake runs (a login node with internet), never on a GPU node.
localrules:
    fetch_model,


rule fetch_model:
    output:
        f"{HUB_CACHE}/{{repo}}/{{revision}}/{HUB_MARKER}",
    wildcard_constraints:
        repo=r"[^/]+--[^/]+",
        revision=r"[^/]+",
    log:
        f"{LOGS}/fetch_model/{{repo}}/{{revision}}.log",
    params:
        repo=lambda wc: wc.repo.replace("--", "/", 1),
        out=lambda wc, output: Path(output[0]).parent,
    conda:
        "../../envs/augbench.yaml"
    shell:
        "python -m augbench fetch-model --repo {params.repo:q} --revision {wildcards.revision:q} --out {params.out:q} > {log:q} 2>&1"
