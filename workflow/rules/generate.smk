# One job per (method, block of `class_block` classes), the model loaded once; images are cached by chunk under
# generate/{method}/cache/{cls}/, so asking for more images (a larger n_aug) appends and keeps the existing ones
# byte for byte, and a killed block keeps its finished chunks.
rule generate:
    input:
        unpack(generate_inputs),
    output:
        folder=directory(f"{R}/generate/{{method}}/block_{{block}}"),
    wildcard_constraints:
        method=row_pattern(GENERATION_METHODS),
        block=r"\d{4}",
    priority: 1  # on the critical path: scheduled before ready jobs of lower priority
    log:
        f"{LOGS}/generate/{{method}}/block_{{block}}.log",
    benchmark:
        f"{BENCH}/generate/{{method}}/block_{{block}}.tsv"
    # The spec is a param of its own, a function of the wildcards only: Snakemake records such params and reruns
    # the job when they change, but not params computed from the job's input (as `args` is).
    params:
        spec=method_spec("generate"),
        args=generate_args,
        model=lambda wc: generator_of(wc.method)["model"],
        root=lambda wildcards, input: Path(input.table).parents[1],
    threads: config["generate"]["threads"]
    resources:
        gpu=1,
        device=DEVICE,  # where the job may run (config `device`): placement, not a compared param
        mem_mb=block_mem_mb,
        runtime=generate_runtime,  # minutes, from the work and the GPU rates in augbench.plan
    conda:
        "../../envs/augbench.yaml"
    shell:
        "python -m augbench generate --model {params.model:q} --table {input.table:q} --root {params.root:q}"
        " --classes {input.classes:q} {params.args} --spec {params.spec:q} --out {output.folder:q} --threads {threads} --device {resources.device} > {log:q} 2>&1"


# The per-class manifests of a method become one augmentation set: a manifest whose pointers (shard, offset, size)
# lead into the generated chunks, the images' one stored copy; CLIP's zero-shot labels give the method's generation
# fidelity, computed 256 images at a time.
rule collect_generated:
    input:
        unpack(lambda wc: clip_input()),
        blocks=lambda wc: generated_blocks(wc.method),
        classes=f"{DATA}/classes.json",
    output:
        manifest=f"{R}/augment/{{method}}/manifest.parquet",
        fidelity=f"{R}/augment/{{method}}/fidelity.json",
    wildcard_constraints:
        method=row_pattern(GENERATION_METHODS, filtered=False),
    log:
        f"{LOGS}/collect/{{method}}.log",
    benchmark:
        f"{BENCH}/collect/{{method}}.tsv"
    params:
        clip=CLIP_MODEL,
        manifests=lambda wc: " ".join(shlex.quote(f) for f in generated_files(wc.method, "manifest.parquet")),
        version=STAGE_VERSIONS["collect"],  # a param: bumping it reruns every collect job
    resources:
        device=DEVICE,
        mem_mb=collect_mem_mb,
    conda:
        "../../envs/augbench.yaml"
    shell:
        "python -m augbench collect --manifests {params.manifests} --classes {input.classes:q}"
        " --clip {params.clip:q} --out-manifest {output.manifest:q}"
        " --out-fidelity {output.fidelity:q} --device {resources.device} > {log:q} 2>&1"


# A filtered row's candidates: the same join, under candidates/ (rule filter_augment keeps what the filter keeps).
use rule collect_generated as collect_candidates with:
    output:
        manifest=f"{R}/augment/{{method}}/candidates/manifest.parquet",
        fidelity=f"{R}/augment/{{method}}/candidates/fidelity.json",
    wildcard_constraints:
        method=row_pattern(GENERATION_METHODS, filtered=True),
