# Filtered rows (`filters`): `<row>+<filter>` trains on what its filter keeps of the row's over-generated (or over-fetched)
# candidates, scored by CLIP against the class prompt or by the classifier trained on the real shots alone
# (augbench.filtering). Its manifest points into the candidates' shards: no image is copied.
rule filter_augment:
    input:
        unpack(filter_inputs),
    output:
        manifest=f"{R}/augment/{{method}}/manifest.parquet",
        stats=f"{R}/augment/{{method}}/filter.json",
        fidelity=f"{R}/augment/{{method}}/fidelity.json",  # CLIP's zero-shot fidelity of the kept images
    wildcard_constraints:
        method=row_pattern(GENERATION_METHODS + tuple(RETRIEVAL_MODES), filtered=True),
    log:
        f"{LOGS}/filter/{{method}}.log",
    benchmark:
        f"{BENCH}/filter/{{method}}.tsv"
    params:
        spec=lambda wc: stage_spec("filter", **filter_settings(wc.method)),
        n_aug=max(N_AUG),
        clip=CLIP_MODEL,
        args=filter_args,
    resources:
        gpu=1,  # CLIP (or the classifier) over every candidate, as collect_generated
        device=DEVICE,
    conda:
        "../../envs/augbench.yaml"
    shell:
        "python -m augbench filter --candidates {input.candidates:q} --classes {input.classes:q} --spec {params.spec:q}"
        " --n-aug {params.n_aug} --clip {params.clip:q} {params.args} --out-manifest {output.manifest:q}"
        " --out-stats {output.stats:q} --out-fidelity {output.fidelity:q} --device {resources.device} > {log:q} 2>&1"
