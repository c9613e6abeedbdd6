"""The test harness itself: shared end-to-end runs are built once per session, long test files go first."""

import multiprocessing
import os
from pathlib import Path

import pytest

from tests.conftest import LONG_FIRST, built_once


class _Factory:
    """What built_once reads of pytest's tmp_path_factory: the worker's base folder."""

    def __init__(self, base: Path):
        self.base = base

    def getbasetemp(self) -> Path:
        return self.base


def _slow_build(path: Path) -> None:
    import time

    path.mkdir()
    time.sleep(1.0)  # long enough for the other caller to arrive while this one builds
    with open(path.parent / "builds.log", "a") as fh:
        fh.write(f"{os.getpid()}\n")
    (path / "result").write_text("built")


def _ask(shared: Path, worker: str, out: multiprocessing.Queue) -> None:
    os.environ["PYTEST_XDIST_WORKER"] = worker
    try:
        target = built_once(_Factory(shared / f"popen-{worker}"), "thing", _slow_build)
        out.put((worker, (target / "result").read_text()))
    except BaseException as exc:
        out.put((worker, f"error: {exc}"))


def test_two_workers_asking_at_once_build_once(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    workers = [ctx.Process(target=_ask, args=(tmp_path, f"gw{i}", out)) for i in range(2)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(timeout=120)
    answers = dict(out.get(timeout=5) for _ in workers)
    assert answers == {"gw0": "built", "gw1": "built"}
    assert len((tmp_path / "builds.log").read_text().split()) == 1
    assert (tmp_path / "thing" / "result").is_file()  # in the folder both workers share


def test_a_failed_build_is_reported_to_later_callers_without_building_again(tmp_path, monkeypatch):
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    calls = []

    def broken(path):
        calls.append(path)
        raise RuntimeError("the demo did not build")

    with pytest.raises(RuntimeError, match="the demo did not build"):
        built_once(_Factory(tmp_path), "demo", broken)
    with pytest.raises(AssertionError, match=r"(?s)building demo failed in another worker.*the demo did not build"):
        built_once(_Factory(tmp_path), "demo", broken)
    assert len(calls) == 1


def test_long_files_come_first_and_a_files_tests_stay_together(request):
    items = request.session.items
    ranks = [LONG_FIRST.index(i.path.name) if i.path.name in LONG_FIRST else len(LONG_FIRST) for i in items]
    assert ranks == sorted(ranks)
    where: dict[str, list[int]] = {}
    for k, item in enumerate(items):
        where.setdefault(item.path.name, []).append(k)
    assert all(k[-1] - k[0] + 1 == len(k) for k in where.values()), where
