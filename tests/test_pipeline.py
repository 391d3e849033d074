"""The whole pipeline: a real Prefect flow run, and the CLI's one-off commands on real files."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import os
from pathlib import Path

from conftest import write_digits_folder

from featurebank.classifiers.probes import DEFAULT_PROBES
from featurebank.pipelines.cli import main  # the CLI in-process (argv in, exit status out): what a user types


def test_run_flow_end_to_end_on_a_real_prefect_api(tmp_path, prefect_api, digits_folder):
    from prefect.client.orchestration import get_client

    from featurebank import RunParams, run_flow  # the flow and its parameters as users composing deployments get them

    params = RunParams(source=str(digits_folder), store_dir=str(tmp_path / "store"), out_dir=str(tmp_path / "runs"),
                       pixel_baseline=True)
    state = run_flow(params, return_state=True)
    assert state.is_completed()
    out = state.result()
    run_dir = Path(out["dir"])
    for name in ("metrics.json", "report.md", "report.html", "confusion_matrix.png", "embedding_map.png"):
        assert (run_dir / name).stat().st_size > 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["probes"]) == set(DEFAULT_PROBES) | {"pixels"}
    assert all(0.0 <= m["accuracy"] <= 1.0 for m in metrics["probes"].values())
    assert (run_dir / "classifiers" / "logreg" / "manifest.json").is_file()

    async def artifacts():
        async with get_client() as client:
            return await client.read_artifacts()

    import asyncio

    keys = {a.key for a in asyncio.run(artifacts())}
    assert "featurebank-report" in keys


def test_cli_extract_train_predict(tmp_path, capsys, monkeypatch):
    digits_folder = write_digits_folder(tmp_path / "digits", per_class=15)
    monkeypatch.chdir(tmp_path)
    assert main(["extract", str(digits_folder), "--store", "store"]) == 0
    store = capsys.readouterr().out
    assert store.endswith(".h5\n") and store.count("\n") == 1 and Path(store.strip()).is_file()  # the path alone
    store = store.strip()

    assert main(["train", store, "--out", "runs"]) == 0
    out = capsys.readouterr().out
    accuracies = json.loads(out)  # stdout holds the metrics JSON alone
    assert set(accuracies) == set(DEFAULT_PROBES)

    classifier = next(Path("runs").glob("*/classifiers/logreg"))
    assert main(["predict", str(classifier), str(digits_folder), "--store", "store", "--out", "pred.csv"]) == 0
    rows = list(csv.DictReader(open("pred.csv", encoding="utf-8")))
    assert len(rows) == 45 and {"id", "predicted", "probability"} <= set(rows[0])
    # the images were embedded already: predict reused the store (said on stderr; stdout: the CSV path)
    printed = capsys.readouterr()
    assert "no forward pass" in printed.err and printed.out == "pred.csv\n"
    right = sum(r["predicted"] == r["id"].split("/")[0] for r in rows)
    assert right >= 40  # trained on most of these very images: nearly all must come back right


def test_bad_parameters_answer_at_once_with_one_line(tmp_path):
    import socket

    with socket.socket() as s:  # a Prefect API where nothing listens: contacting it would be another error
        s.bind(("127.0.0.1", 0))
        env = dict(os.environ, PREFECT_API_URL=f"http://127.0.0.1:{s.getsockname()[1]}/api")
    cases = [
        (["extract", str(tmp_path / "nope")], "does not exist"),
        (["extract", str(tmp_path), "--backbone", "resnet9000"], "unknown backbone"),
        (["extract", str(tmp_path), "--batch-size", "0"], "--batch-size"),  # the option, not the field
        (["run", str(tmp_path), "--probes", "nope"], "unknown probe"),
        (["train", str(tmp_path / "missing.h5")], "does not exist"),
        (["demo", "imagenet"], "unknown demo dataset"),
    ]
    for argv, expected in cases:
        proc = subprocess.run([sys.executable, "-m", "featurebank.pipelines.cli", *argv], capture_output=True, text=True,
                              cwd=tmp_path,
                              env=env)
        assert proc.returncode != 0, argv
        assert expected in proc.stderr and proc.stderr.count("\n") == 1, (argv, proc.stderr)
        assert "Traceback" not in proc.stderr
    # answered before any Prefect server was needed: none was contacted (that would be its own error line)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing was created
