"""The ``featurebank`` command line: extract, train, fewshot, predict, compare, run, demo, serve.

Parameters are checked (pydantic) before anything starts, Prefect's server included, so a mistyped
option answers at once with one line and exit status 2. Known failures (a bad file, a damaged store,
a classifier from another backbone) print one line and exit 1; nothing is half-written.
"""

from __future__ import annotations

import argparse
import os
import sys

EXIT_USAGE, EXIT_FAILED = 2, 1


class UsageError(ValueError):
    """An option value that argparse accepted but that does not parse."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        sys.stderr.write(f"featurebank: error: {message} (see 'featurebank {self.prog.split()[-1]} --help')\n"
                         if " " in self.prog else f"featurebank: error: {message}\n")
        sys.exit(EXIT_USAGE)


def _source_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source-format", choices=("auto", "folder", "manifest", "parquet", "webdataset"),
                   help="how to read the source (default: detected from it)")
    p.add_argument("--image-column", help="Parquet/Arrow: the image column (HF Image struct, binary or path; default: detected)")
    p.add_argument("--label-column", help="Parquet/Arrow: the label column (default: label)")
    p.add_argument("--storage-option", dest="storage_options", action="append", metavar="KEY=VALUE",
                   help="fsspec option for remote sources (repeatable), e.g. anon=true")


def _extract_options(p: argparse.ArgumentParser) -> None:
    _source_options(p)
    p.add_argument("--backbone", default="efficientnet_lite0",
                   help="efficientnet_lite0 (bundled), efficientnet_lite2, tv:NAME[:WEIGHTS], timm:NAME, or a checkpoint path")
    p.add_argument("--layer", help="embed an intermediate layer by node name (global-average-pooled)")
    p.add_argument("--arch", help="architecture of a state_dict checkpoint (tv:NAME or timm:NAME)")
    p.add_argument("--store", dest="store_dir", default="featurebank-store", help="folder of HDF5 stores")
    p.add_argument("--dataset", help="dataset name in the store file name (default: the folder's name)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument("--workers", type=int, help="decoding worker processes (default: chosen from the machine)")
    p.add_argument("--dtype", default="float32", help="stored embedding type: float32 or float16")
    p.add_argument("--runtime", help="auto (default: OpenVINO on a CPU when it agrees with torch), torch or openvino")
    p.add_argument("--precision", help="how the forward pass computes: f32 (default), bf16 or int8")
    p.add_argument("--content-hash", action="store_true", help="fingerprint files by sha256, not size+mtime")
    p.add_argument("--retry-failures", action="store_true", help="try again the files recorded as unusable")


_DEFAULT_PROBES = "logreg,knn,svm,ridge"
_PROBES_HELP = "comma-separated: logreg, knn, svm, ridge, mlp (default logreg,knn,svm,ridge)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="featurebank", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("extract", help="embed a folder or manifest into an HDF5 store; prints its path")
    p.add_argument("source", help="image folder (one subfolder per class), .csv manifest, Parquet/Arrow tables, "
                   "WebDataset tars ('shards/train-{0000..0099}.tar'), local or a URL")
    _extract_options(p)
    p.add_argument("--prefect", action="store_true", help="run as a Prefect flow")

    p = sub.add_parser("train", help="train probes on a store and write a report; prints the metrics")
    p.add_argument("store", help="an HDF5 store file written by 'extract'")
    p.add_argument("--out", dest="out_dir", default="featurebank-runs", help="folder for runs (reports, classifiers)")
    p.add_argument("--probes", default=_DEFAULT_PROBES, help=_PROBES_HELP)
    p.add_argument("--memory-budget", dest="memory_budget_mb", type=float,
                   help="MB: when the embeddings exceed it, train the logistic probe out of core within it")
    p.add_argument("--shots", help="also add a few-shot table (logreg, knn) to the report, e.g. 1,5,10")
    p.add_argument("--seeds", type=int, help="few-shot draws per number of shots (default 5)")
    p.add_argument("--prefect", action="store_true", help="run as a Prefect flow")

    p = sub.add_parser("fewshot", help="few-shot accuracy (mean ± 95%% CI over seeds); writes fewshot.json/.md")
    p.add_argument("store", help="an HDF5 store file written by 'extract'")
    p.add_argument("--shots", default="1,5,10", help="comma-separated examples per class (default 1,5,10)")
    p.add_argument("--seeds", type=int, default=5, help="draws per number of shots (default 5)")
    p.add_argument("--probes", default="logreg,knn", help="logreg and/or knn")
    p.add_argument("--out", dest="out_dir", default="featurebank-runs", help="folder for runs")

    p = sub.add_parser("export", help="write a store's ids, labels, splits and embeddings as Parquet; prints its path")
    p.add_argument("store", help="an HDF5 store file written by 'extract'")
    p.add_argument("--to", default="parquet", help="output format: parquet (a fixed-size list column of embeddings)")
    p.add_argument("--out", help="file to write (default: the store's path with .parquet)")

    p = sub.add_parser("compare", help="print a markdown table of several runs' metrics side by side")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders written by 'train' or 'run'")

    p = sub.add_parser("predict", help="classify images with a saved classifier; writes a CSV")
    p.add_argument("classifier", help="a classifier folder written by 'train' (…/classifiers/logreg), or a "
                   "probe folder of versions written by 'run' (<out>/classifiers/logreg: its current version)")
    p.add_argument("source", help="image folder, manifest, Parquet/Arrow tables or WebDataset tars, local or a URL")
    _source_options(p)
    p.add_argument("--out", default="predictions.csv", help="CSV file to write")
    p.add_argument("--store", dest="store_dir", default="featurebank-store")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device")
    p.add_argument("--prefect", action="store_true", help="run as a Prefect flow")

    for name, helptext in (("run", "extract, train and report in one Prefect flow"),
                           ("demo", "build a bundled demo dataset and run the whole pipeline on it"),
                           ("serve", "serve the run flow as a scheduled Prefect deployment (needs a Prefect server)")):
        p = sub.add_parser(name, help=helptext)
        if name in ("run", "serve"):
            p.add_argument("source", help="image folder or manifest")
        else:
            p.add_argument("demo", nargs="?", default="mnist5k", help="mnist5k (default), digits or fashion-mnist")
            p.add_argument("--size", type=int, help="fashion-mnist: number of images (default 5000)")
            p.add_argument("--data-dir", default="featurebank-data", help="where demo images are written")
            p.add_argument("--format", dest="demo_format", default="folder", choices=("folder", "parquet", "webdataset"),
                           help="write the demo as an image folder (default), HF-style Parquet or WebDataset tars")
        _extract_options(p)
        p.add_argument("--out", dest="out_dir", default="featurebank-runs")
        p.add_argument("--probes", default=_DEFAULT_PROBES, help=_PROBES_HELP)
        p.add_argument("--memory-budget", dest="memory_budget_mb", type=float,
                       help="MB: when the embeddings exceed it, train the logistic probe out of core within it")
        p.add_argument("--pixel-baseline", action="store_true", default=name == "demo",
                       help="also train logistic regression on raw pixels (default for demo)")
        p.add_argument("--shards", type=int, help="split extraction into this many shard tasks on a Dask cluster")
        p.add_argument("--dask-address", help="an existing Dask scheduler (tcp://host:8786); default: a local cluster")
        if name == "serve":
            p.add_argument("--cron", help='cron schedule, e.g. "0 * * * *" (hourly)')
            p.add_argument("--interval", type=float, help="or: seconds between runs")
            p.add_argument("--name", default="featurebank-scheduled", help="deployment name")
        else:
            p.add_argument("--no-prefect", action="store_true", help="run the same steps without Prefect")
    return parser


def _params(args: argparse.Namespace):
    from pipelines.params import ExportParams, ExtractParams, PredictParams, RunParams, TrainParams

    d = {k: v for k, v in vars(args).items() if v is not None}
    from pipelines.params import FewshotParams

    if "probes" in d:
        d["probes"] = [x.strip() for x in d["probes"].split(",") if x.strip()]
    if "shots" in d:
        try:
            d["shots"] = [int(x) for x in d["shots"].split(",") if x.strip()]
        except ValueError:
            raise UsageError(f"--shots must be comma-separated integers, not '{d['shots']}'") from None
    pick = lambda model: model(**{k: v for k, v in d.items() if k in model.model_fields})
    return {"extract": lambda: pick(ExtractParams), "train": lambda: pick(TrainParams),
            "predict": lambda: pick(PredictParams), "run": lambda: pick(RunParams),
            "serve": lambda: pick(RunParams), "fewshot": lambda: pick(FewshotParams),
            "export": lambda: pick(ExportParams)}[args.command]()


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # the server's telemetry heartbeat phones home (there is no network here) and races the first
    # start-up on SQLite ("database is locked" tracebacks): off unless the user turns it on
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    args = build_parser().parse_args(argv)
    from pydantic import ValidationError

    from classifiers.persist import ClassifierError
    from classifiers.train import TrainingError
    from data.demo import DemoError
    from data.sources import SourceError
    from features.backbones import BackboneError
    from features.store import StoreError
    from pipelines.params import one_line

    # a file system error (disk full, permission denied) is reported like the others: one line, exit 1
    known = (SourceError, BackboneError, StoreError, ClassifierError, TrainingError, DemoError, OSError)
    if args.command == "compare":
        from classifiers.report import compare_runs

        try:
            print(compare_runs(args.run_dirs), end="")
        except FileNotFoundError as exc:
            print(f"featurebank: error: {one_line(exc)}", file=sys.stderr)
            return EXIT_FAILED
        return 0
    try:
        if args.command == "demo":
            from data.demo import build

            if args.size is not None and args.size < 10:
                raise DemoError(f"--size must be at least 10, not {args.size}")
            source = build(args.demo, args.data_dir, args.size, format=args.demo_format)
            print(f"demo dataset: {source}")
            args.source, args.command = str(source), "run"
            args.dataset = None
        params = _params(args)
        if args.command == "serve" and (args.cron is None) == (args.interval is None):
            print("featurebank: error: give a schedule: --cron \"0 * * * *\" or --interval SECONDS", file=sys.stderr)
            return EXIT_USAGE
    except (ValidationError, UsageError) as exc:
        print(f"featurebank: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except known as exc:
        print(f"featurebank: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_FAILED
    try:
        return _dispatch(args, params)
    except known as exc:
        print(f"featurebank: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("featurebank: interrupted; committed work is kept and a rerun resumes", file=sys.stderr)
        return 130


def _dispatch(args, params) -> int:
    import json

    from pipelines import jobs

    if args.command == "serve":
        from pipelines.deploy import serve

        try:
            serve(params, cron=args.cron, interval=args.interval, name=args.name)
        except RuntimeError as exc:
            print(f"featurebank: error: {exc}", file=sys.stderr)
            return EXIT_FAILED
        return 0
    if args.command == "export":
        from features.export import export_parquet

        print(export_parquet(params.store, params.out))
        return 0
    if args.command == "fewshot":
        out = jobs.run_fewshot(params)
        print(out["markdown_text"].split("\n\n", 2)[-1], end="")
        print(f"few-shot table: {out['markdown']}")
        return 0
    use_prefect = getattr(args, "prefect", False) or (args.command == "run" and not args.no_prefect)
    if use_prefect:
        from pipelines import flows

        flow = {"extract": flows.extract_flow, "train": flows.train_flow,
                "predict": flows.predict_flow, "run": flows.run_flow}[args.command]
        state = flow(params, return_state=True)
        if not state.is_completed():
            exc = state.result(raise_on_failure=False)
            raise exc if isinstance(exc, Exception) else RuntimeError(f"flow ended {state.name}")
        out = state.result()
    else:
        out = {"extract": jobs.run_extract, "train": jobs.run_train, "predict": jobs.run_predict,
               "run": jobs.run_all}[args.command](params)
    if args.command == "extract":
        print(out["path"] if isinstance(out, dict) else out.path)
    elif args.command in ("train", "run"):
        rows = out["rows"]
        print(json.dumps({r["probe"]: round(r["accuracy"], 4) for r in rows}))
        print(f"report: {out['html']}")
        if "delta" in out:
            d = out["delta"]
            print(f"delta: added {d['added']}, changed {d['changed']}, removed {d['removed']}: {d['markdown']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
