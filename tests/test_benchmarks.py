"""The GPU benchmarks run on a CPU with a small shape (the figures themselves come from a GPU run)."""

import re

from tests.conftest import ROOT, run


def test_gpu_extract_benchmark_runs_on_cpu():
    out = run(["python", "gpu_extract.py", "--tiny", "--items", "24"], ROOT / "benchmarks").stdout
    assert re.search(r"tokens/s: [\d,]+", out) and "MFU: n/a" in out


def test_gpu_finetune_benchmark_runs_on_cpu():
    out = run(["python", "gpu_finetune.py", "--tiny", "--steps", "2", "--batch-size", "2"], ROOT / "benchmarks").stdout
    assert re.search(r"lora: 2 steps .* tokens/s [\d,]+", out) and "qlora: skipped" in out
