"""A step's numbers depend on its configuration only: threads and deterministic algorithms set by the step."""

import json
import subprocess
import sys

CODE = """
import json, sys, torch
from moralign.modeling import configure_torch
runtime = configure_torch(3, torch.device("cpu"))
print(json.dumps({**runtime, "enabled": torch.are_deterministic_algorithms_enabled(),
                  "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
                  "inductor_imported": "torch._inductor" in sys.modules}))
"""


def test_configure_torch_sets_threads_and_deterministic_algorithms_cheaply():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, check=True, timeout=300)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["torch_threads"] == 3 and got["device"] == "cpu" and got["deterministic_algorithms"] is True
    assert got["enabled"] and not got["warn_only"]
    assert not got["inductor_imported"], "the compiler stack costs seconds per process and is never used"
