# The results table, the accuracy-vs-n_aug plot, one image grid per augmentation method and the compute cost
# per method (from every rule's benchmark: file). `snakemake --report results/<dataset>/report/report.html`
# then bundles the outputs marked report() with their captions into one HTML file.
rule report:
    input:
        **report_inputs(),
    output:
        csv=report(f"{R}/report/results.csv", caption="../report/results.rst", category="1. Results", labels={"file": "results.csv"}),
        html=report(f"{R}/report/results.html", caption="../report/results.rst", category="1. Results", labels={"file": "table"}),
        md=f"{R}/report/results.md",
        yields=report(f"{R}/report/yield.csv", caption="../report/yield.rst", category="1. Results", labels={"file": "yield.csv"}),
        cost=report(f"{R}/report/cost.csv", caption="../report/cost.rst", category="3. Compute cost", labels={"file": "cost.csv"}),
        method_cost=report(f"{R}/report/cost_by_method.csv", caption="../report/cost.rst", category="3. Compute cost",
                           labels={"file": "cost_by_method.csv"}),
        plot=report(f"{R}/report/accuracy_vs_naug.png", caption="../report/accuracy_vs_naug.rst", category="1. Results",
                    labels={"file": "accuracy_vs_naug.png"}),
        grids=[
            report(f"{R}/report/grids/{m}.png", caption="../report/grids.rst", category="2. Image grids", labels={"method": m})
            for m in AUGMENTED
        ],
    log:
        f"{LOGS}/report.log",
    params:
        args=report_args,
        opts=report_opts(),
        version=STAGE_VERSIONS["report"],  # a param: bumping it reruns the report
        bench=BENCH,
        logs=LOGS,
        root=lambda wildcards, input: Path(input.classes).parent,
    conda:
        "../../envs/augbench.yaml"
    shell:
        "python -m augbench report {params.args} {params.opts} --benchmarks {params.bench:q} --logs {params.logs:q} --classes {input.classes:q}"
        " --real-table {input.real:q} --root {params.root:q} --out-csv {output.csv:q} --out-md {output.md:q} --out-yield {output.yields:q}"
        " --out-html {output.html:q} --out-cost {output.cost:q} --out-method-cost {output.method_cost:q} --out-plot {output.plot:q} 2> {log:q}"
