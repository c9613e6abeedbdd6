"""The step scripts' glue: every parsed argument reaches the step by name, and none is silently dropped."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from moralign import cli


def parsed(*extra: str) -> argparse.Namespace:
    p = cli.parser(None)
    p.add_argument("--dataset")
    p.add_argument("--predictions", dest="pred_dir", type=Path)
    p.add_argument("--out", type=Path)
    return p.parse_args(["--config", "params.yaml", "--sections", "experiment", *extra])


def test_call_passes_arguments_by_name_and_takes_what_the_script_built(monkeypatch):
    monkeypatch.setattr(cli, "start", lambda args: "cfg")  # the configuration is start()'s subject, not call()'s
    seen = {}

    def step(cfg, out, dataset, pred_dir, inputs=None):  # another order than the parser's
        seen.update(cfg=cfg, out=out, dataset=dataset, pred_dir=pred_dir, inputs=inputs)
        return "done"

    args = parsed("--dataset", "dilemmas", "--predictions", "p", "--out", "o")
    assert cli.call(step, args) == "done"
    assert seen == {"cfg": "cfg", "out": Path("o"), "dataset": "dilemmas", "pred_dir": Path("p"), "inputs": None}
    taken = cli.take(args, "pred_dir", "out")
    assert taken == [Path("p"), Path("o")] and not hasattr(args, "pred_dir")
    cli.call(lambda cfg, dataset, inputs: seen.update(inputs=inputs), args, inputs=tuple(taken))
    assert seen["inputs"] == (Path("p"), Path("o"))


def test_call_refuses_an_argument_the_step_does_not_take(monkeypatch):
    monkeypatch.setattr(cli, "start", lambda args: "cfg")
    args = parsed("--dataset", "dilemmas", "--out", "o")
    with pytest.raises(TypeError, match="takes no argument out, pred_dir"):
        cli.call(lambda cfg, dataset: None, args)
