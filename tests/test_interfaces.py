"""One declaration per parameter: the CLI, the config file and the flows' parameters come from the models
in pipelines.params, and each engine option arrives at the engine whichever way it is given."""

from __future__ import annotations

import json

import pytest
from conftest import write_digits_folder

# Internals, on purpose: the parameter models and the CLI/config/flow generator (pipelines.params, pipelines.cli):
# internals by design.
from featurebank.pipelines.cli import COMMANDS, build_parser, flag_of, is_positional, main, parse
from featurebank.pipelines.params import EngineOptions, RunParams

# a value other than the default for each engine option, as a config file would give it
ENGINE_VALUES = {"workers": 0, "amp": "bf16", "compile": True, "decoder": "plain", "batch_size": 4}


def test_every_option_is_generated_from_its_field_with_its_default_in_help(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # help lines unwrapped
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices  # argparse's subparsers
    for name, command in COMMANDS.items():
        text = sub[name].format_help()
        for model in command.models:
            for field_name, field in model.model_fields.items():
                if is_positional(field):
                    assert field_name.upper() in text, (name, field_name)
                    continue
                assert flag_of(field_name, field) in text, (name, field_name)
                default = field.get_default(call_default_factory=True)
                if default not in (None, [], False):
                    shown = ",".join(map(str, default)) if isinstance(default, list) else str(default)
                    assert f"(default: {shown})" in text, (name, field_name)
    # the README's flag names, whatever the fields are called
    extract_help = sub["extract"].format_help()
    assert "--store" in extract_help and "--batch-size" in extract_help
    assert "--out" in sub["train"].format_help() and "--memory-budget" in sub["train"].format_help()


def test_batch_size_is_automatic_unless_given(digits_folder):
    _, (params, _) = parse(["extract", str(digits_folder)])
    assert params.batch_size is None and params.engine().batch_size is None
    _, (params, _) = parse(["extract", str(digits_folder), "--batch-size", "8"])
    assert params.batch_size == 8


def test_config_file_values_are_overridden_by_the_command_line(tmp_path, digits_folder):
    config = tmp_path / "run.toml"
    config.write_text(f'source = "{digits_folder}"\nstore = "stores"\nprobes = ["knn", "ridge"]\nbatch-size = 16\n'
                      'memory_budget = 64\ncompile = true\n')
    command, (params, flow) = parse(["run", "--config", str(config), "--batch-size", "2", "--no-prefect"])
    assert command == "run" and isinstance(params, RunParams) and flow.prefect is False
    assert params.source == str(digits_folder) and params.store_dir == "stores" and params.probes == ["knn", "ridge"]
    assert params.batch_size == 2 and params.memory_budget_mb == 64 and params.compile is True


def test_unknown_config_key_is_one_line_naming_the_closest_valid_key(tmp_path, digits_folder, capsys):
    config = tmp_path / "run.toml"
    config.write_text('bacth-size = 16\n')
    assert main(["extract", str(digits_folder), "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown key 'bacth-size'" in err and "did you mean 'batch-size'" in err, err


@pytest.mark.slow
def test_engine_options_arrive_at_the_engine_from_cli_config_and_flow(tmp_path, prefect_api):
    from featurebank.pipelines.flows import run_flow

    folder = write_digits_folder(tmp_path / "digits", per_class=5, classes=(0, 1))
    config = tmp_path / "run.toml"
    config.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in ENGINE_VALUES.items()) + 'dtype = "float16"\n')
    common = ["--probes", "knn"]

    # command line (through --config, with one value overridden on the command line), without Prefect
    assert main(["run", str(folder), "--config", str(config), "--out", str(tmp_path / "cli"), "--decoder", "fast",
                 "--store", str(tmp_path / "cli-store"),
                 "--no-prefect", *common]) == 0
    # a flow's parameters: the same model, built from the same config file
    _, (params, _) = parse(["run", str(folder), "--config", str(config), "--out", str(tmp_path / "flow"),
                              "--store", str(tmp_path / "flow-store"), *common])
    state = run_flow(params, return_state=True)
    assert state.is_completed()

    for runs, decoder in ((tmp_path / "cli", "fast"), (tmp_path / "flow", "plain")):
        (metrics,) = runs.glob("*/metrics.json")
        extraction = json.loads(metrics.read_text())["extraction"]
        settings = extraction["settings"]  # what features.engine.extract ran with
        assert settings["decoder"] == decoder
        assert settings["amp"] == "bf16" and settings["compile"] is True and settings["batch_size"] == 4
        assert settings["workers"] == 0 and settings["replicas"] == 0 and "1 process" in extraction["layout"]
    import h5py

    for store in ("cli-store", "flow-store"):
        with h5py.File(next((tmp_path / store).glob("*.h5")), "r") as f:
            assert f.attrs["dtype"] == "float16"  # the store's attributes


def test_engine_options_are_the_flow_parameters():
    from featurebank.pipelines.flows import extract_flow, run_flow

    for flow in (extract_flow, run_flow):
        schema = json.dumps(flow.parameters.model_dump())
        for name in EngineOptions.model_fields:
            assert f'"{name}"' in schema, (flow.name, name)


def test_help_and_bad_input_are_answered_without_loading_torch_or_sklearn(tmp_path):
    """``--help`` and a bad path answer in well under a second: the option values and the validators'
    imports keep torch, scikit-learn and Prefect out until a command runs (they took ~4 s here)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from pipelines.cli import main\n"
        "codes = [main(['extract', sys.argv[1]]), main(['train', sys.argv[1] + '.h5'])]\n"
        "heavy = sorted(m for m in ('torch', 'sklearn', 'prefect', 'openvino') if m in sys.modules)\n"
        "print(codes, heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "missing")], capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.strip() == "[2, 2] []", (out.stdout, out.stderr)
    assert out.stderr.count("featurebank: error:") == 2 and "does not exist" in out.stderr


def test_probe_names_declared_for_the_cli_are_the_probes():
    from featurebank.classifiers.fewshot import FEWSHOT_PROBES
    from featurebank.classifiers.choices import DEFAULT_PROBES, PROBE_NAMES
    from featurebank.classifiers.probes import PROBES

    assert tuple(PROBES) == PROBE_NAMES and set(DEFAULT_PROBES) <= set(PROBES) and set(FEWSHOT_PROBES) <= set(PROBES)
