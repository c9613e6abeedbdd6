"""The DAG, described once and generated for both front ends.

The stage table (``table``), the code each step runs (``code``), the table bound to a configuration (``plan``) and
the two front ends generated from it (``rules`` for Snakemake, ``dvcfile`` for DVC):

    python -m moralign.pipeline rules                        # workflow/rules/*.smk (committed)
    python -m moralign.pipeline dvc > dvc.yaml               # the paper configuration (committed)
    python -m moralign.pipeline dvc --config config/demo.yaml > dvc.yaml   # the demo through DVC
"""
