rule summarise:
    input:
        unpack(inputs("summarise")),
    output:
        **outputs(
            "summarise",
            reports={
                "csv": dict(
                    caption="../report/results.rst",
                    category="Results table",
                    labels={"table": "long form (CSV)"},
                ),
                "differences": dict(
                    caption="../report/differences_table.rst",
                    category="Results table",
                    labels={"table": "fine-tuned minus base (CSV)"},
                ),
            },
        ),
    params:
        **params("summarise"),
    log:
        log_of("summarise"),
    shell:
        shell_of("summarise")


rule plot:
    input:
        unpack(inputs("plot")),
    output:
        **outputs(
            "plot",
            reports={"png": dict(caption="../report/figures.rst", category="Figures", subcategory="{dataset}")},
        ),
    params:
        **params("plot"),
    wildcard_constraints:
        **constraints("plot"),
    log:
        log_of("plot"),
    shell:
        shell_of("plot")
