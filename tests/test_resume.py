"""Long steps survive SIGKILL: extraction resumes from its shards, fine-tuning from its last checkpoint."""

import json
import re
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml

from moralign.config import validate
from moralign.steps import fetch_model
from tests.conftest import ROOT, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, raw_dir, processed):
    """A config, processed dilemmas and a base model big enough that a step takes a few seconds."""
    root = tmp_path_factory.mktemp("resume")
    raw = yaml.safe_load((ROOT / "config/demo.yaml").read_text())
    raw["models"] = {
        "tiny-llama": {
            "build": {
                "architecture": "llama",
                "seed": 5,
                "vocab_size": 600,
                "hidden_size": 384,
                "intermediate_size": 768,
                "num_layers": 6,
                "num_heads": 6,
                "num_kv_heads": 2,
            }
        }
    }
    raw["experiment"]["models"] = ["tiny-llama"]
    raw["extract"].update(shard_size=6, max_batch_size=2)
    raw["finetune"].update(max_steps=40, eval_steps=10, batch_size=4)
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    fetch_model.run(
        validate(raw), "tiny-llama", [raw_dir / "anecdotes.tar.gz", raw_dir / "dilemmas.tar.gz"], root / "base"
    )
    return root, config, processed["dilemmas"]


def script(name, *args):
    return [sys.executable, str(ROOT / f"workflow/scripts/{name}.py"), *map(str, args)]


def kill_when(cmd, cwd, ready, log, timeout=300):
    """Start ``cmd`` and SIGKILL it as soon as ``ready()`` holds; returns what ``ready`` saw."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            seen = ready()
            if seen:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return seen
            if proc.poll() is not None:
                pytest.fail(f"finished before it could be killed; see {log}")
            time.sleep(0.01)
        pytest.fail("timed out waiting to kill")
    finally:
        if proc.poll() is None:
            proc.kill()


def test_extraction_resumes_after_sigkill(workspace):
    root, config, data = workspace
    args = [
        "--config",
        config,
        "--model",
        "tiny-llama",
        "--dataset",
        "dilemmas",
        "--condition",
        "base",
        "--data-dir",
        data,
        "--base",
        root / "base",
    ]
    run(script("extract", *args, "--out-dir", root / "whole", "--log", root / "whole.log"), root)
    out = root / "killed"
    parts = root / ".killed.dev.parts"
    finished = kill_when(
        script("extract", *args, "--out-dir", out, "--log", root / "killed.log"),
        root,
        lambda: sorted(p.name for p in parts.glob("shard-*.parquet")) if parts.exists() else [],
        root / "killed.log",
    )
    assert not (out / "dev.parquet").exists()
    run(script("extract", *args, "--out-dir", out, "--log", root / "resumed.log"), root)
    log = (root / "resumed.log").read_text()
    reused = re.findall(r"shard (shard-\d+\.parquet) already done; reused", log)
    assert set(finished) <= set(reused), "every shard finished before the kill is reused"
    redone_dev = len(re.findall(r"shard shard-\d+\.parquet: \d+ items", log.split(" dev: ")[0]))
    total_dev = -(-len(pd.read_parquet(data / "dev.parquet")) // 6)
    assert redone_dev == total_dev - len(reused)  # at most the shard in progress at the kill is redone twice
    for split in ("dev", "test"):
        pd.testing.assert_frame_equal(
            pd.read_parquet(out / f"{split}.parquet"), pd.read_parquet(root / "whole" / f"{split}.parquet")
        )
    assert not parts.exists()


def test_finetuning_resumes_after_sigkill_and_is_not_redone(workspace):
    root, config, data = workspace
    out = root / "adapter"
    args = [
        "--config",
        config,
        "--model",
        "tiny-llama",
        "--dataset",
        "dilemmas",
        "--recipe",
        "soft",
        "--data-dir",
        data,
        "--base",
        root / "base",
        "--out",
        out,
    ]
    checkpoints = root / "adapter.checkpoints"
    kill_when(
        script("finetune", *args, "--log", root / "ft-killed.log"),
        root,
        lambda: (checkpoints / "checkpoint-20" / "trainer_state.json").exists(),
        root / "ft-killed.log",
    )
    assert not out.exists()
    run(script("finetune", *args, "--log", root / "ft-resumed.log"), root)
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["steps"] == 40
    assert meta["resumed_from_step"] >= 20, "training continued from the checkpoint instead of starting over"
    assert "resuming from the last checkpoint" in (root / "ft-resumed.log").read_text()
    stamp = (out / "adapter_model.safetensors").stat().st_mtime_ns
    run(script("finetune", *args, "--log", root / "ft-again.log"), root)
    assert "already trained" in (root / "ft-again.log").read_text()
    assert (out / "adapter_model.safetensors").stat().st_mtime_ns == stamp
