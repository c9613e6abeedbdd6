"""Shared fixtures: synthetic Scruples data and tiny models of both architectures, built once per session."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The suite runs on two pytest-xdist workers (pyproject: -n 2 --dist loadfile --no-loadscope-reorder): each test
# file is one unit of work, so a module's fixtures are built once. xdist hands the files out in collection order: the
# long end-to-end files go first, longest chain first, so the two workers start on the two longest ones and the short
# files fill in at the end. A file missing here runs after these, larger files first; the order changes only when a
# test runs, never what it checks. (Files, not xdist_group marks: --dist loadgroup ignores the marks under pytest 9.)
LONG_FIRST = [
    "test_dvc.py",  # DVC's repro of the demo (one job at a time), then the experiment (eight fine-tunings)
    "test_workflow.py",  # the demo through Snakemake (demo_run), then its HTML report
    "test_slurm.py",  # the demo's DAG through SLURM
    "test_reproducibility.py",  # two blocks of the demo rebuilt
    "test_dag.py",  # every module edited in copies of both finished demos
    "test_seeds.py",
    "test_resume.py",
    "test_extending.py",
    "test_openai.py",
    "test_encoders.py",
]


def pytest_configure(config):
    # No network: a hub lookup would hang ~50 s before failing. Caches go to a temp dir, never $HOME.
    cache = Path(tempfile.gettempdir()) / "moralign-test-cache"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HOME", str(cache / "hf"))
    os.environ.setdefault("MPLCONFIGDIR", str(cache / "mpl"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("DVC_SITE_CACHE_DIR", str(cache / "dvc-site"))
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    for key, value in (("NAME", "moralign tests"), ("EMAIL", "tests@moralign.invalid")):
        os.environ.setdefault(f"GIT_AUTHOR_{key}", value)
        os.environ.setdefault(f"GIT_COMMITTER_{key}", value)


def pytest_collection_modifyitems(config, items):
    """The long files first (see LONG_FIRST), then the others, larger files first."""
    sizes: dict[str, int] = {}
    for item in items:
        sizes[item.path.name] = sizes.get(item.path.name, 0) + 1

    def rank(item):
        name = item.path.name
        return (LONG_FIRST.index(name), 0) if name in LONG_FIRST else (len(LONG_FIRST), -sizes[name])

    items.sort(key=rank)  # stable: the tests of a file keep their order


@pytest.fixture(scope="session")
def raw_dir(tmp_path_factory) -> Path:
    """Synthetic release archives (small splits)."""
    from moralign.sources import fetch_archive

    out = tmp_path_factory.mktemp("raw")
    for archive in ("anecdotes", "dilemmas"):
        fetch_archive(
            "sample", archive, out / f"{archive}.tar.gz", sample={"seed": 3, "train": 160, "dev": 60, "test": 60}
        )
    return out


@pytest.fixture(scope="session")
def processed(raw_dir, tmp_path_factory) -> dict[str, Path]:
    """Processed tables of every task."""
    from moralign.data import TASKS, prepare

    out = tmp_path_factory.mktemp("processed")
    dirs = {}
    for name, task in TASKS.items():
        prepare(name, raw_dir / f"{task.archive}.tar.gz", out / name)
        dirs[name] = out / name
    return dirs


TINY = {
    "llama": {
        "architecture": "llama",
        "chat_format": "llama3",
        "seed": 1,
        "vocab_size": 600,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_layers": 2,
        "num_heads": 4,
        "num_kv_heads": 2,
    },
    "mistral": {
        "architecture": "mistral",
        "chat_format": "mistral",
        "seed": 2,
        "vocab_size": 600,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_layers": 2,
        "num_heads": 4,
        "num_kv_heads": 2,
    },
}


@pytest.fixture(scope="session")
def tiny_models(raw_dir, tmp_path_factory) -> dict[str, Path]:
    """A tiny LlamaForCausalLM and MistralForCausalLM saved with save_pretrained."""
    from moralign.tinymodels import build_tiny_model

    out = tmp_path_factory.mktemp("models")
    archives = [raw_dir / "anecdotes.tar.gz", raw_dir / "dilemmas.tar.gz"]
    for name, spec in TINY.items():
        build_tiny_model(spec, archives, out / name)
    return {name: out / name for name in TINY}


def copy_repo(dest: Path) -> Path:
    """The tracked files of the repository (what a fresh clone has), copied to ``dest``."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        src = ROOT / rel
        if src.is_file() or src.is_symlink():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel, follow_symlinks=False)
    return dest


BIN = Path(sys.executable).parent


def run(cmd, cwd, timeout=900, check=True) -> subprocess.CompletedProcess:
    """Run a command (list, or str for the shell) with this environment's tools first on PATH."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, shell=isinstance(cmd, str)
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """``name``, built by ``build(path)`` once per test session however many xdist workers ask for it.

    The first worker to ask builds it, holding a lock in the folder all workers share; the others wait on the lock
    and then use the result, or fail with the builder's error without building again. Tests must not change it:
    each worker works on its own copy (:func:`copy_tree`).
    """
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    target, done, failed = shared / name, shared / f"{name}.done", shared / f"{name}.failed"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if failed.exists():
            raise AssertionError(f"building {name} failed in another worker:\n{failed.read_text()}")
        if not done.exists():
            try:
                build(target)
            except BaseException:
                failed.write_text(traceback.format_exc())
                raise
            done.touch()
    return target


def copy_tree(src: Path, dest: Path) -> Path:
    """A copy of a finished run, times kept (what Snakemake and DVC compare), links copied as links."""
    shutil.copytree(src, dest, symlinks=True)
    return dest


def _snakemake_demo(root: Path) -> None:
    repo = copy_repo(root / "repo")
    t0 = time.perf_counter()
    run(["snakemake", "--cores", "2", "--configfile", "config/demo.yaml"], repo, timeout=1800)
    print(f"snakemake run of the demo: {time.perf_counter() - t0:.0f} s")


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> Path:
    """A fresh copy of the repository after ``snakemake --cores 2 --configfile config/demo.yaml``.

    The run happens once per session (:func:`built_once`); this is the worker's own copy of it.
    """
    built = built_once(tmp_path_factory, "snakemake", _snakemake_demo)
    return copy_tree(built / "repo", tmp_path_factory.mktemp("snakemake") / "repo")


def dvc_yaml_for(repo: Path, config: str) -> None:
    """Generate ``repo/dvc.yaml`` for ``config`` the way docs/reproducibility.md says."""
    out = run([sys.executable, "-m", "moralign.pipeline", "dvc", "--config", config], repo).stdout
    (repo / "dvc.yaml").write_text(out)


# DVC runs one stage at a time, so the DVC repository is one block of the demo that still holds every kind of
# stage (a causal LM with both recipes, an encoder; one dataset): its cells are the demo's cells, byte for byte
# (tests/test_dvc.py), at a quarter of the demo's cost. Every instance of the whole demo is checked against
# Snakemake's plan by tests/test_dag.py::test_snakemake_and_dvc_agree_on_every_instance.
DVC_BLOCK = {"experiment": {"models": ["tiny-llama", "tiny-bert"], "datasets": ["anecdotes"]}}
DVC_CONFIG = "config/demo-dvc.yaml"


def _dvc_demo(root: Path) -> None:
    import yaml

    from moralign.config import merge

    repo = copy_repo(root / "repo")
    demo = yaml.safe_load((repo / "config/demo.yaml").read_text())
    (repo / DVC_CONFIG).write_text(yaml.safe_dump(merge(demo, DVC_BLOCK), sort_keys=False))
    dvc_yaml_for(repo, DVC_CONFIG)
    run("git init -q && git add -A && git commit -qm init", repo)
    run(["dvc", "remote", "modify", "--local", "local", "url", str(root / "remote")], repo)
    t0 = time.perf_counter()
    run(["dvc", "repro"], repo, timeout=2400)
    print(f"dvc repro of the demo: {time.perf_counter() - t0:.0f} s")
    run("git add -A && git commit -qm 'demo run'", repo)


@pytest.fixture(scope="session")
def dvc_demo(tmp_path_factory) -> Path:
    """A git + DVC repository with the dvc.yaml of a block of the demo (:data:`DVC_CONFIG`), reproduced once per
    session, with a local remote.

    Shared by every worker and never changed: a test that changes a DVC repository copies this one (see dvc_repo).
    """
    return built_once(tmp_path_factory, "dvc", _dvc_demo) / "repo"


@pytest.fixture(scope="session")
def dvc_repo(dvc_demo, tmp_path_factory) -> Path:
    """This worker's copy of :func:`dvc_demo` (same remote), changed in turn by the tests that use it."""
    return copy_tree(dvc_demo, tmp_path_factory.mktemp("dvc") / "repo")
