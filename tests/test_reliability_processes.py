"""Worker processes die with their parent: a real extraction is killed with SIGKILL while its workers
embed, and none of them may outlive it by more than a few seconds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from ops_images import alive, write_folder

ROOT = Path(__file__).resolve().parents[1]

# the GPU layout's DataLoader workers, forced on the CPU (the engine takes a layout, as the tests do)
LOADER_EXTRACT = (
    "import sys\n"
    "from features.engine import extract\n"
    "from features.device import Layout\n"
    "extract(sys.argv[1], 'efficientnet_lite0', sys.argv[2], layout=Layout('cpu', 0, 1, 2), batch_size=4)\n"
)


@pytest.mark.parametrize("kind", ["cpu-replicas", "loader-workers"])
def test_workers_die_when_their_parent_is_killed(tmp_path, kind):
    folder = tmp_path / "digits"
    write_folder(folder, n_per_class=150)  # far more than the few seconds the test lets it run
    if kind == "cpu-replicas":
        args = [sys.executable, "-m", "featurebank.pipelines.cli", "extract", str(folder), "--store", str(tmp_path / "store"),
                "--workers", "2", "--batch-size", "4"]
    else:
        args = [sys.executable, "-c", LOADER_EXTRACT, str(folder), str(tmp_path / "store")]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    children: list[int] = []
    log = tmp_path / "extract.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        parent = psutil.Process(proc.pid)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and len(children) < 2:
            time.sleep(0.2)
            children = [c.pid for c in parent.children(recursive=True)]
        time.sleep(2.0)  # the workers are decoding and embedding
        assert proc.poll() is None, f"the extraction ended before it could be killed:\n{log.read_text()[-2000:]}"
        assert len(children) >= 2, f"expected two worker processes, found {children}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 5
        while alive(children) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = alive(children)
        assert not left, f"workers {left} outlived their killed parent"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in alive(children):
            os.kill(pid, signal.SIGKILL)  # the workers this test started, should the check have failed


def _work_and_end(started: bool) -> None:
    if started:
        from featurebank.features.executors import worker_started

        worker_started()


def test_a_worker_forked_after_a_flow_ran_in_its_parent_ends_with_exit_code_0(prefect_api):
    """A flow run in this process starts Prefect's log and event services, which leave a threading exit
    hook that fails in a forked child: a child that does nothing about it ends with exit code 1 when
    its work is done (a DataLoader then stopped the sweep with "worker exited unexpectedly"); a worker
    of ours drops the hook (worker_started) and ends with 0."""
    import multiprocessing as mp

    from prefect import flow, get_run_logger

    @flow
    def hello():
        get_run_logger().info("a flow in this process")

    hello()
    codes = {}
    for started in (False, True):
        p = mp.get_context("fork").Process(target=_work_and_end, args=(started,))
        p.start()
        p.join(60)
        codes[started] = p.exitcode
    assert codes[False] == 1, f"the exit hook no longer fails in a forked child (Prefect upgraded?): {codes}"
    assert codes[True] == 0, codes
