"""How much of the demo's wall time is process start-up: the demo's DAG run with (almost) no work in it.

    python benchmarks/demo_floor.py                 # the floor: the demo's jobs, each doing almost nothing
    python benchmarks/demo_floor.py --with-demo     # and the demo itself, timed the same way
    python benchmarks/demo_floor.py --cores 4

Every step of the workflow is its own process (one Snakemake job, one DVC stage), so each pays Python, torch,
transformers and model loading before its first useful operation. benchmarks/demo_floor.yaml cuts every step's
work to a minimum (8 items per split, 1 fine-tuning step, 1 encoder epoch, 10 bootstrap resamples) on the same
stages and jobs as config/demo.yaml: the wall time of that run is what the demo cannot go below on this machine
without fewer processes. Runs go to data/<run>, models/<run>, results/<run>, reports/<run>, logs/*/<run> (run names
`floor` and `demo-timed`, never the demo's own outputs) and are deleted before and after.

Prints, per run: wall seconds, CPU seconds of the jobs and of Snakemake itself, and the jobs per rule with their
mean time (from Snakemake's log, whole seconds).
"""

import argparse
import collections
import datetime
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OVERLAY = Path(__file__).with_name("demo_floor.yaml")


def clean(run: str) -> None:
    """Delete every output and log of ``run`` (the path grammar of moralign.pipeline.table)."""
    for root in ("data", "models", "results", "reports"):
        shutil.rmtree(ROOT / root / run, ignore_errors=True)
    for folder in (ROOT / "logs").glob(f"*/{run}"):
        shutil.rmtree(folder, ignore_errors=True)


def job_times(log: str) -> dict[str, list[float]]:
    """Seconds per job, by rule, from Snakemake's progress log (its timestamps have whole seconds)."""
    stamp, rule, started, times = None, None, {}, collections.defaultdict(list)
    for line in log.splitlines():
        if m := re.match(r"\[(\w{3} \w{3}\s+\d+ [\d:]+ \d{4})\]", line):
            stamp = datetime.datetime.strptime(" ".join(m[1].split()), "%a %b %d %H:%M:%S %Y")
        elif m := re.match(r"(?:local)?rule (\w+):", line):
            rule = m[1]
        elif (m := re.match(r"\s+jobid: (\d+)", line)) and rule:
            started[m[1]], rule = (rule, stamp), None
        elif (m := re.match(r"Finished jobid: (\d+)", line)) and m[1] in started:
            name, t0 = started.pop(m[1])
            times[name].append((stamp - t0).total_seconds())
    return times


def timed_run(name: str, run: str, overlays: list[Path], cores: int) -> None:
    """Run the demo DAG under ``run`` with ``overlays`` from nothing, and print what it took."""
    clean(run)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    cmd = [sys.executable, "-m", "snakemake", "--cores", str(cores), "--configfile", "config/demo.yaml"]
    cmd += [str(o) for o in overlays]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        sys.exit(f"{name}: snakemake failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    times = job_times(proc.stderr)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    jobs = sum(map(len, times.values()))
    print(f"{name}: {wall:.1f} s wall on {cores} cores, {jobs} jobs, {cpu:.0f} s CPU (jobs and Snakemake)")
    for rule, ts in sorted(times.items(), key=lambda kv: -sum(kv[1])):
        print(f"  {rule:16s} {len(ts):3d} jobs  mean {sum(ts) / len(ts):5.1f} s  sum {sum(ts):6.0f} s")
    clean(run)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--with-demo", action="store_true", help="also time the demo itself (run name demo-timed)")
    args = p.parse_args(argv)
    timed_run("floor (demo DAG, almost no work)", "floor", [OVERLAY], args.cores)
    if args.with_demo:
        with tempfile.TemporaryDirectory() as tmp:
            overlay = Path(tmp) / "timed.yaml"
            overlay.write_text("run: demo-timed\n")
            timed_run("demo", "demo-timed", [overlay], args.cores)


if __name__ == "__main__":
    main()
