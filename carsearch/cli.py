"""``carsearch`` command line: parse, load config, call the pipeline, print. No logic lives here."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from carsearch.config import PipelineConfig, to_dict
from carsearch.errors import CarSearchError, ConfigError
from carsearch.types import BBox

if TYPE_CHECKING:
    from carsearch.pipeline import Evaluation
    from carsearch.pipeline.ray_engine import RayOptions


def _common(
    parser: argparse.ArgumentParser, config: str | None = None, models: bool = True, set_help: str | None = None
) -> None:
    """The shared flags a command honours: ``--config`` (when ``config`` says what it holds), ``--set``,
    ``--device`` and ``--detector-weights`` (when the command runs models), ``-v``. A command that would
    ignore a flag does not take it (argparse refuses it)."""
    if config is not None:
        parser.add_argument("--config", help=config)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=set_help or "config override, e.g. --set detector.confidence=0.4 (repeatable)",
    )
    if models:
        parser.add_argument("--device", help="auto (default), cpu, cuda, cuda:1")
        parser.add_argument(
            "--detector-weights",
            help="YOLO weights (.pt/.onnx/.tflite; a path or an s3:// URI); default yolo11n.pt (downloads)",
        )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


PIPELINE_YAML = "pipeline YAML (see configs/); defaults are used without it"
INDEX_YAML = "YAML whose index section replaces the index's own search settings"
FROM_INDEX = "override the index's own config (its manifest), e.g. --set detector.confidence=0.4 (repeatable)"


def _overrides(args: argparse.Namespace) -> list[str]:
    from carsearch.config import rerank_overrides

    # --rerank presets first, so that --set retrieval.… refines them
    overrides = rerank_overrides(args.rerank) if getattr(args, "rerank", None) else []
    overrides += args.overrides
    if getattr(args, "device", None):
        overrides.append(f"runtime.device={args.device}")
    if getattr(args, "detector_weights", None):
        overrides.append(f"detector.weights={args.detector_weights}")
    for name, key in (("batch_size", "runtime.batch_size"), ("workers", "runtime.workers")):
        if getattr(args, name, None) is not None:
            overrides.append(f"{key}={getattr(args, name)}")
    if getattr(args, "raw", False):
        overrides.append("crop=false")
    if getattr(args, "crop_source", None):
        overrides.append(f"crop_source={args.crop_source}")
    if getattr(args, "model", None):
        overrides.append(f"embedder.checkpoint={args.model}")
    if getattr(args, "flip", False):
        overrides.append("embedder.flip=true")
    return overrides


RERANK_HELP = (
    "search post-processing: none, aqe (query expansion), dba (database-side augmentation), kreciprocal "
    "(k-reciprocal re-ranking), or a comma-separated combination; tune with --set retrieval.KEY=VALUE"
)


def _cam_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", choices=["gradcam", "gradcam++", "eigencam"], default="gradcam")
    parser.add_argument("--layer", help="CAM target layer, e.g. backbone.bn2 (default: automatic for the backbone)")


def _box(text: str | None) -> BBox | None:
    if not text:
        return None
    try:
        return BBox(*(float(v) for v in text.split(",")))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"--box must be x1,y1,x2,y2 with x1 <= x2 and y1 <= y2, got {text!r}") from exc


def _where(pairs: list[str]) -> dict[str, str] | None:
    where = {}
    for pair in pairs:
        column, sep, value = pair.partition("=")
        if not sep or not column:
            raise ConfigError(f"--where needs COLUMN=VALUE, got {pair!r}")
        where[column] = value
    return where or None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="carsearch", description="Detect-then-embed car image retrieval.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("index", help="crop and index a folder / CSV / Stanford devkit / Kaggle dataset")
    p.add_argument(
        "source",
        help="folder tree (label = sub-folder), CSV (path,label[,x1,y1,x2,y2]) or dataset root; "
        "a folder or CSV may be a URI (s3://bucket/cars/, gs://...)",
    )
    p.add_argument("--out", required=True, help="index directory (created; re-running resumes)")
    p.add_argument("--raw", action="store_true", help="no detector: embed whole images")
    p.add_argument("--crop-source", choices=["detector", "gt"], help="gt: use CSV/devkit boxes when present")
    p.add_argument("--split", choices=["train", "test", "all"], default="all", help="devkit/Kaggle split")
    p.add_argument("--where", action="append", default=[], metavar="COLUMN=VALUE", help="CSV row filter (repeatable)")
    p.add_argument("--model", help="trained embedder checkpoint (carsearch export; a path or an s3:// URI)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--workers", type=int, help="decode worker processes (0 = in the main process)")
    p.add_argument("--prune", action="store_true", help="drop indexed images the source no longer lists")
    p.add_argument(
        "--engine", choices=["local", "ray"], default="local", help="ray: Ray Data actors (pip install '.[ray]')"
    )
    p.add_argument("--ray-address", help="existing Ray cluster (e.g. auto, ray://head:10001); default: a local one")
    p.add_argument("--ray-cpus", type=int, help="CPUs of the local Ray cluster (default: all cores)")
    p.add_argument(
        "--ray-actors",
        metavar="D,E",
        help="detector, embedder actors (default: half the CPUs each, at least 1)",
    )
    p.add_argument("--ray-gpus-per-actor", type=float, help="GPUs per embedder actor (default 1 when GPUs exist)")
    p.add_argument(
        "--flip", action="store_true", help="flip test-time augmentation (mean of image and mirror); queries follow"
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _common(p, config=PIPELINE_YAML)

    p = sub.add_parser("search", help="top-k gallery cars for a query image")
    p.add_argument("index", help="index directory")
    p.add_argument("image", help="query image")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--exclude-self", action="store_true", help="drop gallery items with the query's exact bytes")
    p.add_argument("--rerank", metavar="METHODS", help=RERANK_HELP)
    p.add_argument("--json", action="store_true")
    _common(p, set_help=FROM_INDEX)

    p = sub.add_parser("evaluate", help="leave-one-out Recall@k, MAP@R, R-Precision of a labelled index")
    p.add_argument("index", help="index directory")
    p.add_argument("--rerank", metavar="METHODS", help=RERANK_HELP + "; reports plain and post-processed metrics")
    p.add_argument("--json", action="store_true")
    _common(p, config=INDEX_YAML, models=False, set_help=FROM_INDEX)

    p = sub.add_parser("audit", help="relabelling candidates: neighbours disagree, duplicates labelled differently")
    p.add_argument("index", help="index directory")
    p.add_argument("-k", type=int, default=10, help="neighbours considered per item")
    p.add_argument(
        "--max-agree", type=float, default=0.2, help="flag items with at most this share of agreeing neighbours"
    )
    p.add_argument("--near", type=float, default=0.995, help="cosine similarity that counts as a near duplicate")
    p.add_argument("--json", action="store_true")
    _common(p, config=INDEX_YAML, models=False, set_help=FROM_INDEX)

    # Listed for --help; main() hands their arguments to the training package's own parsers.
    p = sub.add_parser("explain", help="GradCAM overlays for a query's top results (and its attention-in-box)")
    p.add_argument("index", help="index directory")
    p.add_argument("image", help="query image")
    p.add_argument("--top", type=int, default=3, help="results to explain (default 3)")
    p.add_argument("--out", required=True, help="folder for query.png, pair_NN.png, topk.png, explain.json")
    p.add_argument("--box", help="the car's box in the query, x1,y1,x2,y2 (default: the detector's)")
    p.add_argument("--exclude-self", action="store_true", help="skip gallery items with the query's exact bytes")
    p.add_argument("--redact", action="store_true", help="draw the CAMs on grey, not on the photos (shareable)")
    _cam_options(p)
    _common(p, set_help=FROM_INDEX)

    p = sub.add_parser("attention", help="attention-in-box over a dataset: how much CAM energy falls on the car")
    p.add_argument("source", help="CSV with boxes (path,label,x1,y1,x2,y2), folder, devkit or Kaggle root")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--raw", action="store_true", help="only whole photos (default: raw and crop)")
    mode.add_argument("--crop", action="store_true", help="only crops (pasted back into the photo)")
    p.add_argument("--crop-source", choices=["detector", "gt"], help="crops from the detector (default) or gt boxes")
    p.add_argument("--model", help="trained embedder checkpoint (carsearch export); default: pretrained backbone")
    p.add_argument("--split", choices=["train", "test", "all"], default="all", help="devkit/Kaggle split")
    p.add_argument("--where", action="append", default=[], metavar="COLUMN=VALUE", help="CSV row filter (repeatable)")
    p.add_argument("--limit", type=int, help="first N images only")
    p.add_argument("--out", help="folder for attention.json and attention.png")
    p.add_argument("--batch-size", type=int, default=8, help="images per CAM forward/backward (default 8)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true")
    _cam_options(p)
    _common(p, config=PIPELINE_YAML)

    p = sub.add_parser("demo", help="the Gradio web demo over an index (binds to 127.0.0.1)")
    p.add_argument("index", help="index directory (usually built with cropping)")
    p.add_argument("--raw-index", help="a second index of the same images, built with --raw: shown side by side")
    p.add_argument("--model", help="trained embedder checkpoint the index(es) were built with")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (needs internet)")
    p.add_argument("--method", choices=["gradcam", "gradcam++", "eigencam"], default="gradcam")
    p.add_argument("--rerank", metavar="METHODS", help=RERANK_HELP)
    _common(p, set_help=FROM_INDEX)

    p = sub.add_parser(
        "compare", help="the cropped-vs-raw experiment as a report (report.md, report.html, results.json)"
    )
    p.add_argument("--config", help="experiment YAML (see configs/compare.yaml); defaults without it")
    p.add_argument("--out", required=True, help="output folder; re-running reuses finished stages")
    p.add_argument("--quick", action="store_true", help="a small subset (6+6 classes, 1 short epoch) in a few minutes")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:1 (the experiment's `device`)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    sub.add_parser("train", help="fine-tune an embedder: train [--config configs/train/X.yaml] [KEY=VALUE ...]")
    sub.add_parser("export", help="write a training run's best model as an inference checkpoint: export RUN OUT.pt")
    return parser


def command_parsers() -> dict[str, argparse.ArgumentParser]:
    """Every command's parser, ``train`` and ``export`` included (they parse their own arguments)."""
    from carsearch.embedder.training.run import export_parser, train_parser

    subs = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parsers: dict[str, argparse.ArgumentParser] = dict(subs.choices)
    parsers.update(train=train_parser(), export=export_parser())
    return parsers


def flags_markdown() -> str:
    """README's table of every command's arguments and flags, generated from the parsers."""
    lines = ["| command | arguments | flags |", "|---|---|---|"]
    for name, parser in command_parsers().items():
        positional, flags = [], []
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if action.option_strings:
                flags.append(f"`{action.option_strings[0]}`")
            else:
                meta = action.metavar or action.dest.upper()
                positional.append(f"[{meta} ...]" if action.nargs == "*" else str(meta))
        lines.append(f"| `carsearch {name}` | {' '.join(positional) or '–'} | {', '.join(flags)} |")
    return "\n".join(lines)


def _cmd_train_argv(argv: list[str]) -> int:
    from carsearch.embedder.training import train_main

    return train_main(argv)


def _cmd_export_argv(argv: list[str]) -> int:
    from carsearch.embedder.training import export_main

    return export_main(argv)


def _cmd_index(args: argparse.Namespace) -> int:
    from carsearch.pipeline import Pipeline

    pipeline = Pipeline.from_config(args.config, _overrides(args))
    report = pipeline.index(
        args.source,
        args.out,
        split=args.split,
        progress=not args.no_progress,
        where=_where(args.where),
        prune=args.prune,
        engine=args.engine,
        ray=_ray_options(args) if args.engine == "ray" else None,
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(
            f"indexed {report.processed} images ({report.items_added} items) in {report.seconds:.1f}s "
            f"= {report.images_per_second:.1f} img/s: {report.added} added, {report.replaced} replaced (changed); "
            f"{report.skipped} kept (unchanged); {report.pruned} pruned; "
            f"{report.errors} errors (see {Path(args.out) / 'errors.jsonl'}); "
            f"{report.no_detection} without a detected vehicle; index now holds {report.items_in_index} items"
        )
    return 0


def _ray_options(args: argparse.Namespace) -> RayOptions:
    from carsearch.pipeline.ray_engine import RayOptions

    pools = [None, None]
    if args.ray_actors:
        try:
            pools = [(int(n), int(n)) for n in args.ray_actors.split(",")]
        except ValueError:
            raise ConfigError(f"--ray-actors takes D,E (two counts), got {args.ray_actors!r}") from None
        if len(pools) != 2 or min(min(p) for p in pools) < 1:
            raise ConfigError(f"--ray-actors takes D,E (two counts >= 1), got {args.ray_actors!r}")
    return RayOptions(args.ray_address, args.ray_cpus, pools[0], pools[1], args.ray_gpus_per_actor)


def _cmd_search(args: argparse.Namespace) -> int:
    from carsearch.pipeline import Pipeline

    pipeline = Pipeline.for_index(args.index, _overrides(args))
    result = pipeline.search(args.index, args.image, k=args.k, exclude_self=args.exclude_self)
    plan = result.query_plan
    if args.json:
        print(
            json.dumps(
                {
                    "query": {
                        "path": args.image,
                        "box": plan.region.as_list() if plan.region else None,
                        "flags": list(plan.flags),
                        "det_score": plan.detection.score if plan.detection else None,
                    },
                    "hits": [
                        {"rank": h.rank, "score": round(h.score, 5), "label": h.label, "path": h.path, "id": h.item_id}
                        for h in result.hits
                    ],
                    "timings_ms": {k: round(v, 2) for k, v in result.timings_ms.items()},
                },
                indent=2,
            )
        )
        return 0
    where = (
        "whole image (no vehicle found)"
        if "no_detection" in plan.flags
        else ("whole image (raw index)" if plan.region is None else f"box {plan.region.as_list()}")
    )
    print(f"query: {args.image} — embedded {where}")
    print(f"{'rank':>4}  {'score':>7}  {'label':<40}  path")
    for hit in result.hits:
        print(f"{hit.rank:>4}  {hit.score:7.4f}  {str(hit.label)[:40]:<40}  {hit.path}")
    return 0


def _search_config(args: argparse.Namespace) -> PipelineConfig:
    """The index's own config (its manifest), or ``--config``, with ``--set`` / ``--rerank`` applied on top."""
    from carsearch.config import load_config
    from carsearch.pipeline import Pipeline

    overrides = _overrides(args)
    if args.config:
        return load_config(args.config, overrides)
    return Pipeline.for_index(args.index, overrides).config


def _print_metrics(evaluation: Evaluation, reranked: Evaluation | None, methods: str) -> None:
    m = evaluation.metrics
    print(
        f"items: {evaluation.items} (labelled {evaluation.labelled_items}, no_detection {evaluation.no_detection}); "
        f"queries: {m.num_queries} (+{m.num_lone_queries} lone, left out)"
    )
    rows = [(f"Recall@{k}", lambda e, k=k: e.metrics.recall_at[k]) for k in m.recall_at]
    rows += [("MAP@R", lambda e: e.metrics.map_at_r), ("R-Prec", lambda e: e.metrics.r_precision)]
    if reranked is not None:
        print(f"{'':<10}{'plain':>8}  {methods}")
    for name, value in rows:
        print(f"{name:<10}{value(evaluation):8.4f}" + (f"  {value(reranked):.4f}" if reranked is not None else ""))
    if m.other_year_share is not None:
        print(f"wrong top-1 that is the same make/model in another year: {m.other_year_share:.4f}")


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from carsearch.index import GalleryIndex
    from carsearch.pipeline import evaluate_index

    config = _search_config(args)
    gallery = GalleryIndex.load(args.index, config.index)
    evaluation = evaluate_index(gallery)
    reranked = None if config.retrieval.plain else evaluate_index(gallery, config.retrieval)
    if args.json:
        extra = {"reranked": reranked.metrics.to_dict(), "retrieval": to_dict(config.retrieval)} if reranked else {}
        print(json.dumps({**evaluation.to_dict(), **extra}, indent=2))
        return 0
    _print_metrics(evaluation, reranked, args.rerank or "post-processed")
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    from carsearch.index import GalleryIndex
    from carsearch.pipeline.audit import audit_index

    gallery = GalleryIndex.load(args.index, _search_config(args).index)
    report = audit_index(gallery, k=args.k, max_agree=args.max_agree, near=args.near)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    print(f"{len(report.duplicates)} duplicate pairs with different labels:")
    for d in report.duplicates:
        print(f"  [{d.kind} {d.similarity:.4f}] {d.path_a} ({d.label_a})  <->  {d.path_b} ({d.label_b})")
    print(f"{len(report.disagreements)} items whose {report.k} nearest neighbours mostly carry another label:")
    for d in report.disagreements[:50]:
        print(f"  {d.path}  label {d.label!r}, {d.agree:.0%} agree; {d.majority_share:.0%} say {d.majority_label!r}")
    if len(report.disagreements) > 50:
        print(f"  … {len(report.disagreements) - 50} more (use --json for all)")
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    from carsearch.pipeline import Pipeline
    from carsearch.pipeline.explaining import explain_query, save_explanation

    pipeline = Pipeline.for_index(args.index, _overrides(args))
    explanation = explain_query(
        pipeline, args.index, args.image, args.top, args.method, args.layer, _box(args.box), args.exclude_self
    )
    summary = save_explanation(explanation, args.out, redact=args.redact)
    print(f"query: {args.image}; overlays in {args.out}")
    for hit in summary["hits"]:
        print(f"  #{hit['rank']}  {hit['score']:.4f}  {hit['label']}")
    if summary["attention_in_box"] is None:
        print("attention-in-box: no car box known (no detection; pass --box x1,y1,x2,y2)")
    else:
        print(f"attention-in-box: {summary['attention_in_box']:.3f} of the query's CAM energy is on the car box")
    return 0


def _cmd_attention(args: argparse.Namespace) -> int:
    from carsearch.data.atomic import atomic_write_json
    from carsearch.data.sources import read_source
    from carsearch.explain.render import attention_plot
    from carsearch.pipeline import Pipeline
    from carsearch.pipeline.explaining import attention_dataset

    pipeline = Pipeline.from_config(args.config, _overrides(args))
    items = read_source(args.source, args.split, _where(args.where))[: args.limit]
    modes = [False] if args.raw else [True] if args.crop else [False, True]
    reports = [
        attention_dataset(pipeline, items, crop, args.method, args.layer, args.batch_size, not args.no_progress)
        for crop in modes
    ]
    result = {
        "source": str(args.source),
        "model": pipeline.embedder.source,
        "images": len(items),
        "modes": {r.mode: r.to_dict(with_items=False) for r in reports},
    }
    if args.out:
        out = Path(args.out)
        atomic_write_json(out / "attention.json", {**result, "items": {r.mode: r.items for r in reports}})
        attention_plot({r.mode: r.summary for r in reports}, out / "attention.png", f"attention-in-box ({args.method})")
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{'mode':<5} {'images':>6} {'mean':>6} {'median':>6} {'<0.5':>6} {'chance':>6} {'skipped':>7}")
    for r in reports:
        d = r.to_dict(with_items=False)
        print(
            f"{r.mode:<5} {d['count']:>6} {d['mean']:6.3f} {d['median']:6.3f} {d['share_mostly_outside']:6.1%} "
            f"{d['chance']:6.3f} {d['skipped']:>7}"
        )
    if args.out:
        print(f"written: {Path(args.out) / 'attention.json'}, {Path(args.out) / 'attention.png'}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported
    from carsearch.demo.app import launch
    from carsearch.demo.handlers import DemoBackend

    overrides = [o for o in _overrides(args) if not o.startswith("embedder.checkpoint=")]
    backend = DemoBackend.load(args.index, args.raw_index, args.model, overrides, args.method)
    print(f"carsearch demo: http://{args.host}:{args.port} (index {args.index}; Ctrl+C stops)")
    launch(backend, args.host, args.port, args.share)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from carsearch.compare import compare, load_compare_config

    logging.getLogger("carsearch").setLevel(logging.INFO)
    overrides = [*args.overrides, *([f"device={args.device}"] if args.device else [])]
    config = load_compare_config(args.config, overrides, quick=args.quick)
    command = "carsearch " + " ".join(shlex.quote(a) for a in args.argv)
    paths = compare(config, args.out, command=command)
    print(f"report: {paths['md']} (and {paths['html'].name}, {paths['json'].name})")
    return 0


COMMANDS = {
    "compare": _cmd_compare,
    "demo": _cmd_demo,
    "explain": _cmd_explain,
    "attention": _cmd_attention,
    "index": _cmd_index,
    "search": _cmd_search,
    "evaluate": _cmd_evaluate,
    "audit": _cmd_audit,
}


def _forwarded(command: str, argv: list[str]) -> int:
    """``train`` and ``export`` own their argument parsing (training config overrides)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("carsearch").setLevel(logging.INFO)
    try:
        return _cmd_train_argv(argv) if command == "train" else _cmd_export_argv(argv)
    except CarSearchError as exc:
        print(f"carsearch {command}: error: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("train", "export"):
        return _forwarded(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    args.argv = argv
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return COMMANDS[args.command](args)
    except CarSearchError as exc:
        print(f"carsearch {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"carsearch {args.command}: interrupted; finished work is saved — re-run to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
