"""The ``featurebank`` command line, generated from the parameter models in pipelines.params.

Each command is a list of models; every field becomes a flag (``--batch-size``; ``flag=`` in the field
renames it, as ``--store`` for ``store_dir``) or, when required, a positional argument. ``--help``
shows each field's help and default. ``--config run.toml`` (any command) supplies values by the same
names; the command line overrides it. Parameters are checked (pydantic) before anything starts,
Prefect's server included, so a mistyped option answers at once with one line and exit status 2.
Known failures (a bad file, a damaged store, a classifier from another backbone) print one line and
exit 1; nothing is half-written.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
import types
import typing
from dataclasses import dataclass

from pydantic import BaseModel, ValidationError

from featurebank.pipelines.params import (AsFlow, AsFlowByDefault, AuditParams, CompareParams, DemoParams, ExportParams,
                              ExtractParams, FewshotParams, InfoParams, LsParams, PredictParams, RunParams, ServeParams,
                              SweepParams, TrainParams, one_line)

EXIT_USAGE, EXIT_FAILED = 2, 1


class UsageError(ValueError):
    """A parameter that does not parse (a config file's bad key, say): one line, exit status 2."""


@dataclass(frozen=True)
class Command:
    help: str
    models: tuple[type[BaseModel], ...]


COMMANDS = {
    "extract": Command("embed a folder or manifest into an HDF5 store; prints its path", (ExtractParams, AsFlow)),
    "train": Command("train probes on a store and write a report; prints the metrics", (TrainParams, AsFlow)),
    "fewshot": Command("few-shot accuracy (mean ± 95%% CI over seeds); writes fewshot.json/.md", (FewshotParams,)),
    "export": Command("write a store's ids, labels, splits and embeddings as Parquet; prints its path", (ExportParams,)),
    "audit": Command("find label issues, duplicates, train/test leaks and drift in a store; writes audit.json/.md "
                     "and CSV files", (AuditParams,)),
    "compare": Command("print a markdown table of several runs' metrics side by side", (CompareParams,)),
    "predict": Command("classify images with a saved classifier; writes a CSV", (PredictParams, AsFlow)),
    "run": Command("extract, train and report in one Prefect flow", (RunParams, AsFlowByDefault)),
    "sweep": Command("embed with several backbones and layers in one pass and rank them (LogME, probe accuracy "
                     "with its confidence interval, speed, baseline); prints the ranking as JSON", (SweepParams, AsFlow)),
    "demo": Command("build a bundled demo dataset and run the whole pipeline on it", (DemoParams, AsFlowByDefault)),
    "serve": Command("serve the run flow as a scheduled Prefect deployment (needs a Prefect server)", (ServeParams,)),
    "ls": Command("list the stores and runs under a folder (default: here)", (LsParams,)),
    "info": Command("show everything a store holds, but its embeddings", (InfoParams,)),
}


# ------------------------------------------------------------------------------------- the generator


def _scalar(annotation):
    """(base type, is a list) of a field annotation such as ``int | None`` or ``list[str]``."""
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        return _scalar(annotation)
    if typing.get_origin(annotation) is list:
        return _scalar(typing.get_args(annotation)[0])[0], True
    return annotation, False


def _extra(field) -> dict:
    return field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}


def flag_of(name: str, field) -> str:
    return _extra(field).get("flag") or "--" + name.replace("_", "-")


def is_positional(field) -> bool:
    return field.is_required() or bool(_extra(field).get("positional"))


def labels(models) -> dict[str, str]:
    """field name -> how an error names it: positional arguments as in the usage line (``SOURCE``); options
    by their flag (``--store``, ``--batch-size``; in a config file the key is the flag without dashes), never
    by the internal field name (``store_dir``)."""
    return {name: name.upper() if is_positional(f) else flag_of(name, f) for m in models for name, f in m.model_fields.items()}


def _default_text(field) -> str:
    if field.is_required():
        return ""
    value = field.get_default(call_default_factory=True)
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        value = ",".join(map(str, value)) or "none"
    return f" (default: {value})"


def add_options(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    """One argparse argument per field of ``model``; nothing is given a default here (the model has them)."""
    fields = sorted(model.model_fields.items(), key=lambda item: not _extra(item[1]).get("first"))  # stable
    for name, field in fields:
        base, many = _scalar(field.annotation)
        help_text = ((field.description or "") + _default_text(field)).replace("%", "%%")
        kwargs = {"help": help_text, "default": argparse.SUPPRESS}
        if base in (int, float) and not many:
            kwargs["type"] = base  # argparse answers 'invalid int value' for a mistyped number
        if typing.get_origin(base) is typing.Literal:
            kwargs["choices"] = typing.get_args(base)
        if is_positional(field):
            nargs = "*" if many else "?"  # the value may come from --config instead
            parser.add_argument(name, metavar=name.upper(), nargs=nargs, **kwargs)
        elif _extra(field).get("repeat"):
            parser.add_argument(flag_of(name, field), dest=name, action="append", metavar="VALUE", **kwargs)
        elif base is bool:
            parser.add_argument(flag_of(name, field), dest=name, action=argparse.BooleanOptionalAction, **kwargs)
        else:
            metavar = None if "choices" in kwargs else flag_of(name, field).lstrip("-").replace("-", "_").upper()
            parser.add_argument(flag_of(name, field), dest=name, metavar=metavar, **kwargs)


def _comma_lists(values: dict, models) -> dict:
    """'logreg,knn' -> ['logreg', 'knn'] for list fields (a config file may give a real list)."""
    out = dict(values)
    for m in models:
        for name, field in m.model_fields.items():
            if name in out and _scalar(field.annotation)[1] and isinstance(out[name], str):
                out[name] = [x.strip() for x in out[name].split(",") if x.strip()]
    return out


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        sys.stderr.write(f"featurebank: error: {message} (see 'featurebank {self.prog.split()[-1]} --help')\n"
                         if " " in self.prog else f"featurebank: error: {message}\n")
        sys.exit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="featurebank", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        p.add_argument("--config", metavar="FILE.toml", help="read parameters from a TOML file (the command line "
                       "overrides it); keys are the option names, e.g. batch-size = 64")
        for model in command.models:
            add_options(p, model)
    return parser


CONFIG_LIMIT = 1 << 20  # bytes: a config file holds a few options, not megabytes


def read_config(path: str, models) -> dict:
    """A TOML file's values by field name; an unknown key is a one-line UsageError naming the closest one."""
    import tomllib

    from featurebank.data.files import UnreadableFile, read_regular

    try:  # a regular file of at most CONFIG_LIMIT bytes: a FIFO or /dev/zero is answered at once
        raw = read_regular(path, CONFIG_LIMIT)
    except UnreadableFile as exc:
        raise UsageError(f"config file {exc}: give a TOML file") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"config file {path} is not UTF-8 text (byte {exc.start}: {raw[exc.start:exc.start + 1]!r}); "
                         "TOML files are UTF-8: save it as UTF-8") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config file {path} is not valid TOML ({exc})") from None
    keys = {}
    for m in models:
        for name, field in m.model_fields.items():
            keys[name.replace("_", "-")] = name
            keys[flag_of(name, field).lstrip("-")] = name
    out = {}
    for key, value in data.items():
        name = keys.get(key.replace("_", "-"))
        if name is None:
            close = difflib.get_close_matches(key.replace("_", "-"), list(keys), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UsageError(f"config file {path}: unknown key '{key}'{hint}")
        out[name] = value
    return out


def parse(argv: list[str] | None = None) -> tuple[str, list[BaseModel]]:
    """The command and its validated parameter models (defaults < config file < command line)."""
    args = vars(build_parser().parse_args(argv))
    command = args.pop("command")
    models = COMMANDS[command].models
    config = args.pop("config", None)
    values = (read_config(config, models) if config else {}) | args
    values = _comma_lists(values, models)
    return command, [m(**{k: v for k, v in values.items() if k in m.model_fields}) for m in models]


# ----------------------------------------------------------------------------------------- running

# The errors that are answered with one line (exit 1) instead of a traceback, by the module that
# defines each: an error of a module that was never imported cannot have been raised, so the check
# imports nothing (torch, scikit-learn and Prefect load only for the commands that use them).
KNOWN_ERRORS = (
    ("featurebank.data.sources", "SourceError"), ("featurebank.features.backbones", "BackboneError"),
    ("featurebank.features.store", "StoreError"), ("featurebank.classifiers.persist", "ClassifierError"),
    ("featurebank.classifiers.probes", "TrainingError"), ("featurebank.data.demo", "DemoError"),
    ("featurebank.features.engine", "ModalityError"), ("featurebank.classifiers.runs", "RunFolderError"),
    ("featurebank.pipelines.deploy", "ServeError"), ("featurebank.features.runtimes", "RuntimeUnavailable"),
    ("featurebank.features.sweep", "SweepError"),
)


class KnownErrors:
    """``except Exception as exc: if exc in known`` for the errors of KNOWN_ERRORS, and OSError (a file
    system error: a full disk, permission denied)."""

    def __contains__(self, exc: BaseException) -> bool:
        if isinstance(exc, OSError):
            return True
        return any(module in sys.modules and isinstance(exc, getattr(sys.modules[module], name))
                   for module, name in KNOWN_ERRORS)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # the server's telemetry heartbeat phones home (there is no network here) and races the first
    # start-up on SQLite ("database is locked" tracebacks): off unless the user turns it on
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # flow runs send heartbeats, so that a server marks a killed run Crashed (pipelines.deploy)
    os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "30")
    known = KnownErrors()
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--verbose" in argv:  # any command: Prefect's and Dask's INFO logs on the console too (pipelines.console)
        argv.remove("--verbose")
        os.environ["FEATUREBANK_VERBOSE"] = "1"
    try:
        command, models = parse(argv)
        if command == "demo":
            from featurebank.pipelines.api import demo_params

            demo, flow = models
            command, models = "run", [demo_params(demo), flow]
    except ValidationError as exc:
        command = next((a for a in argv if a in COMMANDS), None)
        print(f"featurebank: error: {one_line(exc, labels(COMMANDS[command].models) if command else None)}",
              file=sys.stderr)
        return EXIT_USAGE
    except UsageError as exc:
        print(f"featurebank: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:
        if exc not in known:
            raise
        print(f"featurebank: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_FAILED
    from featurebank.pipelines.console import to_stderr

    stdout = sys.stdout
    try:
        with to_stderr():  # stdout carries only what scripts consume, printed by _dispatch to `stdout`
            return _dispatch(command, models, stdout)
    except KeyboardInterrupt:
        print("featurebank: interrupted; committed work is kept and a rerun resumes", file=sys.stderr)
        return 130
    except Exception as exc:
        if exc not in known:
            raise
        print(f"featurebank: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_FAILED


def _dispatch(command: str, models: list[BaseModel], stdout=sys.stdout) -> int:
    """Run a command through the public API (pipelines.api): the CLI only parses and prints."""
    import json

    from featurebank.pipelines import api

    params = models[0]
    prefect = len(models) > 1 and models[1].prefect
    if command == "compare":
        print(api.compare(*params.run_dirs), end="", file=stdout)
    elif command == "export":
        print(api.export(params.store, params.out, params.to), file=stdout)
    elif command == "ls":
        print(api.ls(params.dir), end="", file=stdout)
    elif command == "info":
        print(json.dumps(api.info(params.store), indent=2), file=stdout)
    elif command == "serve":
        try:
            api.serve(params)
        except RuntimeError as exc:
            print(f"featurebank: error: {exc}", file=sys.stderr)
            return EXIT_FAILED
    elif command == "audit":
        out = api.audit(params, say=print)
        print(out["markdown"], file=stdout)
    elif command == "fewshot":
        out = api.fewshot(params, say=print)
        print(out["markdown_text"].split("\n\n", 2)[-1], end="", file=stdout)
        print(f"few-shot table: {out['markdown']}")
    elif command == "extract":
        print(api.extract(params, prefect=prefect, say=print).path, file=stdout)
    elif command == "sweep":
        out = api.sweep(params, prefect=prefect, say=print)
        print(json.dumps(out["ranking"]), file=stdout)
        print(f"ranking: {out['markdown']}")
    elif command == "predict":
        print(api.predict(params, None, prefect=prefect, say=print), file=stdout)
    elif command in ("train", "run"):
        result = api.train(params, prefect=prefect, say=print) if command == "train" else api.run(params, prefect=prefect)
        rows = result.report["rows"]
        print(json.dumps({r["probe"]: round(r["accuracy"], 4) for r in rows}), file=stdout)
        if result.unchanged:
            print(result.message)
        print(f"report: {result.report['html']}")
        if result.delta:
            d = result.delta
            classes = "".join(f", classes {what} {', '.join(d[key])}" for what, key in
                              (("added", "classes_added"), ("removed", "classes_removed")) if d.get(key))
            print(f"delta: added {d['added']}, changed {d['changed']}, removed {d['removed']}{classes}: {d['markdown']}")
            if d.get("pruned"):
                gone = {k: v for k, v in d["pruned"].items() if v}
                if gone:
                    print(f"pruned (--keep): {json.dumps(gone)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
