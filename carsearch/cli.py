"""``carsearch`` command line: parse, load config, call the pipeline, print. No logic lives here."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from carsearch.errors import CarSearchError


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="pipeline YAML (see configs/); defaults are used without it")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, e.g. --set detector.confidence=0.4 (repeatable)",
    )
    parser.add_argument("--device", help="auto (default), cpu, cuda, cuda:1")
    parser.add_argument("--detector-weights", help="YOLO weights (.pt/.onnx/.tflite); default yolo11n.pt (downloads)")
    parser.add_argument("-v", "--verbose", action="store_true")


def _overrides(args: argparse.Namespace) -> list[str]:
    overrides = list(args.overrides)
    if args.device:
        overrides.append(f"runtime.device={args.device}")
    if args.detector_weights:
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
    return overrides


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="carsearch", description="Detect-then-embed car image retrieval.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("index", help="crop and index a folder / CSV / Stanford devkit / Kaggle dataset")
    p.add_argument("source", help="folder tree (label = sub-folder), CSV (path,label[,x1,y1,x2,y2]) or dataset root")
    p.add_argument("--out", required=True, help="index directory (created; re-running resumes)")
    p.add_argument("--raw", action="store_true", help="no detector: embed whole images")
    p.add_argument("--crop-source", choices=["detector", "gt"], help="gt: use CSV/devkit boxes when present")
    p.add_argument("--split", choices=["train", "test", "all"], default="all", help="devkit/Kaggle split")
    p.add_argument("--model", help="trained embedder checkpoint (carsearch export)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--workers", type=int, help="decode worker processes (0 = in the main process)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _common(p)

    p = sub.add_parser("search", help="top-k gallery cars for a query image")
    p.add_argument("index", help="index directory")
    p.add_argument("image", help="query image")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--exclude-self", action="store_true", help="drop gallery items with the query's exact bytes")
    p.add_argument("--json", action="store_true")
    _common(p)

    p = sub.add_parser("evaluate", help="leave-one-out Recall@k, MAP@R, R-Precision of a labelled index")
    p.add_argument("index", help="index directory")
    p.add_argument("--json", action="store_true")
    _common(p)

    p = sub.add_parser("audit", help="relabelling candidates: neighbours disagree, duplicates labelled differently")
    p.add_argument("index", help="index directory")
    p.add_argument("-k", type=int, default=10, help="neighbours considered per item")
    p.add_argument(
        "--max-agree", type=float, default=0.2, help="flag items with at most this share of agreeing neighbours"
    )
    p.add_argument("--near", type=float, default=0.995, help="cosine similarity that counts as a near duplicate")
    p.add_argument("--json", action="store_true")
    _common(p)

    # Listed for --help; main() hands their arguments to the training package's own parsers.
    sub.add_parser("train", help="fine-tune an embedder: train [--config configs/train/X.yaml] [KEY=VALUE ...]")
    sub.add_parser("export", help="write a training run's best model as an inference checkpoint: export RUN OUT.pt")
    return parser


def _cmd_train_argv(argv: list[str]) -> int:
    from carsearch.embedder.training import train_main

    return train_main(argv)


def _cmd_export_argv(argv: list[str]) -> int:
    from carsearch.embedder.training import export_main

    return export_main(argv)


def _cmd_index(args: argparse.Namespace) -> int:
    from carsearch.pipeline import Pipeline

    pipeline = Pipeline.from_config(args.config, _overrides(args))
    report = pipeline.index(args.source, args.out, split=args.split, progress=not args.no_progress)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(
            f"indexed {report.processed} images ({report.items_added} items) in {report.seconds:.1f}s "
            f"= {report.images_per_second:.1f} img/s; skipped {report.skipped} already indexed; "
            f"{report.errors} errors (see {Path(args.out) / 'errors.jsonl'}); "
            f"{report.no_detection} without a detected vehicle; index now holds {report.items_in_index} items"
        )
    return 0


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


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from carsearch.index import GalleryIndex
    from carsearch.pipeline import evaluate_index

    evaluation = evaluate_index(GalleryIndex.load(args.index))
    if args.json:
        print(json.dumps(evaluation.to_dict(), indent=2))
        return 0
    m = evaluation.metrics
    print(
        f"items: {evaluation.items} (labelled {evaluation.labelled_items}, no_detection {evaluation.no_detection}); "
        f"queries: {m.num_queries} (+{m.num_lone_queries} lone, left out)"
    )
    for k, value in m.recall_at.items():
        print(f"Recall@{k:<2} {value:.4f}")
    print(f"MAP@R     {m.map_at_r:.4f}\nR-Prec    {m.r_precision:.4f}")
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    from carsearch.index import GalleryIndex
    from carsearch.pipeline.audit import audit_index

    report = audit_index(GalleryIndex.load(args.index), k=args.k, max_agree=args.max_agree, near=args.near)
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


COMMANDS = {
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
