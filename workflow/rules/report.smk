def report_inputs():
    runs = [f"{R}/train/{m}/{n}/{s}/metrics.json" for m, n, s in train_runs()]
    retrieval = [m for m in config["methods"] if m in RETRIEVAL_MODES]
    return {
        "metrics": runs,
        "manifests": [f"{R}/augment/{m}/manifest.parquet" for m in retrieval],
        "stats": [f"{R}/retrieve/{RETRIEVAL_MODES[m]}/stats.json" for m in retrieval],
        "truth": [f"{R}/world/pool/pool.parquet"] if TOY else [],
    }


def report_args(wildcards, input):
    runs = " ".join(
        "--run " + shlex.quote(json.dumps({"method": m, "n_aug": n, "seed": s, "metrics": f}))
        for (m, n, s), f in zip(train_runs(), input.metrics)
    )
    retrieval = [m for m in config["methods"] if m in RETRIEVAL_MODES]
    retr = " ".join(
        f"--retrieval {m} {man} {st}" for m, man, st in zip(retrieval, input.manifests, input.stats)
    )
    truth = f"--truth {input.truth[0]}" if input.truth else ""
    return f"{runs} {retr} {truth}"


rule report:
    input:
        **report_inputs(),
    output:
        csv=f"{R}/report/results.csv",
        md=f"{R}/report/results.md",
    log:
        f"{LOGS}/report.log",
    params:
        args=report_args,
    conda:
        "../../envs/torch.yaml"
    shell:
        "python -m augbench report {params.args} --out-csv {output.csv:q} --out-md {output.md:q} 2> {log:q}"
