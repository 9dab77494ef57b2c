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
