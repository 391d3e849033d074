"""serve: every bad input is one line before any server is contacted, an unreachable server is one line
naming its URL, and runs killed without a goodbye are marked Crashed by Prefect's heartbeat automation."""

from __future__ import annotations

import socket

import pytest
from ops_images import write_folder

# Internals, on purpose: the crash automation (pipelines.deploy) is read back from the server; serve itself is run
# through the CLI.
from featurebank.pipelines.cli import main


def _dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/api"  # nothing listens there once closed


@pytest.mark.parametrize("args, code, expected", [
    (["--interval", "0"], 2, "greater than 0"),
    (["--interval", "-5"], 2, "greater than 0"),
    (["--cron", "every minute"], 2, "is not a cron expression"),
    (["--cron", "61 * * * *"], 2, "is not a cron expression"),
    ([], 2, "give a schedule"),
    (["--cron", "0 * * * *", "--interval", "60"], 2, "give a schedule"),
    (["--interval", "60"], 1, "no Prefect server answers at PREFECT_API_URL={url}"),
])
def test_bad_serve_inputs_are_one_line(tmp_path, monkeypatch, capsys, args, code, expected):
    folder = tmp_path / "digits"
    write_folder(folder, n_per_class=2)
    url = _dead_url()
    monkeypatch.setenv("PREFECT_API_URL", url)
    assert main(["serve", str(folder), "--store", str(tmp_path / "store"), "--out", str(tmp_path / "runs"), *args]) == code
    out = capsys.readouterr()
    assert out.out == "" and len(out.err.strip().splitlines()) == 1, out.err
    assert expected.format(url=url) in out.err and "prefect server start" in out.err if code == 1 else expected in out.err
    assert not (tmp_path / "store").exists() and not (tmp_path / "runs").exists()


def test_the_crash_automation_is_created_once(prefect_api):
    from prefect.client.orchestration import get_client

    from featurebank.pipelines.deploy import CRASH_AUTOMATION, ensure_crash_detection

    ensure_crash_detection()
    assert ensure_crash_detection() is False  # already there: not created twice
    with get_client(sync_client=True) as client:
        (automation,) = client.read_automations_by_name(CRASH_AUTOMATION)
    assert automation.enabled and "prefect.flow-run.heartbeat" in automation.trigger.after
    assert automation.actions[0].state.value == "CRASHED"


def test_a_flow_against_a_server_that_does_not_answer_is_one_line(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "digits"
    write_folder(folder, n_per_class=2)
    url = _dead_url()
    monkeypatch.setenv("PREFECT_API_URL", url)
    assert main(["run", str(folder), "--store", str(tmp_path / "store"), "--out", str(tmp_path / "runs")]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"no Prefect server answers at PREFECT_API_URL={url}" in err, err
    assert not (tmp_path / "store").exists()
