"""``python -m moralign.pipeline {rules,dvc} [--config FILE]``: write the Snakemake rules, or print dvc.yaml."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable

from moralign.config import load_config
from moralign.pipeline.dvcfile import dvc_yaml
from moralign.pipeline.plan import Plan
from moralign.pipeline.rules import write_rules


def main(argv: Iterable[str] | None = None) -> None:
    """Write workflow/rules/*.smk (``rules``) or print the dvc.yaml of a configuration (``dvc``)."""
    p = argparse.ArgumentParser(prog="python -m moralign.pipeline", description=main.__doc__)
    p.add_argument("what", choices=["rules", "dvc"])
    p.add_argument("--config", default="params.yaml", help="the configuration (default params.yaml)")
    args = p.parse_args(list(argv) if argv is not None else None)
    plan = Plan(load_config(args.config))
    if args.what == "dvc":
        sys.stdout.write(dvc_yaml(plan, args.config))
    else:
        for path in write_rules(plan):
            print(path)


if __name__ == "__main__":
    main()
