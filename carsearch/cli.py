"""``carsearch`` command line: parse, load config, call the pipeline, print. No logic lives here."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import logging
import os
import shlex
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from carsearch.config import DEFAULT_MODEL, DEVICE_NAMES, DEVICE_PATTERN, CropSource, PipelineConfig
from carsearch.config_files import load_dataclass, to_dict
from carsearch.data.sources import Split
from carsearch.embedder.zoo import MODELS
from carsearch.errors import CarSearchError, ConfigError
from carsearch.types import BBox, CamMethod, Engine

if TYPE_CHECKING:
    from carsearch.metrics import RetrievalMetrics
    from carsearch.pipeline import Evaluation
    from carsearch.pipeline.ray_engine import RayOptions


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors: ``carsearch search: error: … (see 'carsearch search --help')``."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _checked(name: str, convert: Callable[[str], Any], ok: Callable[[Any], bool], rule: str) -> Callable[[str], Any]:
    """An argparse ``type=``: ``convert`` the text, refuse it unless ``ok``; the message states ``rule``."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"{rule}, got {text!r}")
        return value

    parse.__name__ = name  # argparse names the type in its messages
    parse.__doc__ = f"An argparse type: {rule}."
    return parse


positive_int = _checked("positive_int", int, lambda v: v >= 1, "must be an integer >= 1")
non_negative_int = _checked("non_negative_int", int, lambda v: v >= 0, "must be an integer >= 0")
port_number = _checked("port_number", int, lambda v: 1 <= v <= 65535, "must be a port, 1-65535")
share = _checked("share", float, lambda v: 0.0 <= v <= 1.0, "must be a share in [0, 1]")
similarity = _checked("similarity", float, lambda v: 0.0 < v <= 1.0, "must be a cosine similarity in (0, 1]")
positive_float = _checked("positive_float", float, lambda v: v > 0, "must be a number > 0")
device_name = _checked("device_name", str, lambda v: DEVICE_PATTERN.fullmatch(v) is not None, f"must be {DEVICE_NAMES}")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Help that shows each flag's default, unless it has none (None, False, an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "%(default)" in text or default is None or default is False or default == [] or default is argparse.SUPPRESS:
            return text
        if not action.option_strings and action.nargs not in ("?", "*"):
            return text
        return f"{text} (default: %(default)s)"


def add_set_option(parser: argparse.ArgumentParser, example: str) -> None:
    """``--set KEY=VALUE``, the one override form of every command that reads a config."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"config override, repeatable; {example}",
    )


def _common(
    parser: argparse.ArgumentParser, config: str | None = None, models: str | None = None, set_help: str = ""
) -> None:
    """The shared flags a command honours: ``--config`` (when ``config`` says what it holds), ``--set``,
    ``--device`` and ``--detector-weights`` (when the command runs models; ``models`` says which detector
    is the default), ``-v``. A command that would ignore a flag does not take it (argparse refuses it)."""
    if config is not None:
        parser.add_argument("--config", metavar="CONFIG", help=config)
    add_set_option(parser, set_help or "e.g. --set detector.confidence=0.4")
    if models is not None:
        parser.add_argument("--device", type=device_name, help=DEVICE_HELP)
        parser.add_argument("--detector-weights", metavar="WEIGHTS", help=models)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


DEVICE_HELP = "auto (CUDA when present, else CPU), cpu, cuda, cuda:N, mps; one this machine lacks is refused"
MODEL_HELP = (
    f"embedder: a shipped name ({', '.join(MODELS)}; {DEFAULT_MODEL} is the default; 'carsearch models' "
    "describes them), or a checkpoint from carsearch export (a path or an s3:// URI)"
)
PIPELINE_YAML = "pipeline config: a shipped name (default, offline) or a YAML path; defaults without it"
INDEX_YAML = "config whose index and retrieval sections replace the index's own search settings"
FROM_INDEX = "applied to the index's own config (its manifest), e.g. --set detector.confidence=0.4"
SEARCH_ONLY = (
    "applied to the index's own config; these commands read its index and retrieval sections, "
    "e.g. --set index.nprobe=32"
)
NEW_DETECTOR = "YOLO weights (.pt/.onnx/.tflite; a path or an s3:// URI); default yolo11n.pt (downloads once)"
INDEX_DETECTOR = (
    "YOLO weights replacing the index's own detector file (same model moved elsewhere); default: the index's"
)
OUT = "output folder"


def _overrides(args: argparse.Namespace) -> list[str]:
    """The flags that are config keys, as overrides: ``--rerank`` presets first (``--set retrieval.…`` refines
    them), then ``--set``, then the other flags (a flag wins over a ``--set`` of the same key)."""
    from carsearch.config import rerank_overrides

    values = vars(args)
    overrides = rerank_overrides(values["rerank"]) if values.get("rerank") else []
    overrides += values["overrides"]
    flag_keys = {
        "device": "runtime.device",
        "detector_weights": "detector.weights",
        "batch_size": "runtime.batch_size",
        "workers": "runtime.workers",
        "crop_source": "crop_source",
        "model": "embedder.model",
    }
    overrides += [f"{key}={values[flag]}" for flag, key in flag_keys.items() if values.get(flag) is not None]
    if values.get("raw"):
        overrides.append("crop=false")
    if values.get("flip"):
        overrides.append("embedder.flip=true")
    return overrides


RERANK_HELP = (
    "search post-processing: none, aqe (query expansion), dba (database-side augmentation), kreciprocal "
    "(k-reciprocal re-ranking), or a comma-separated combination; tune with --set retrieval.KEY=VALUE"
)
CAM_METHODS = list(typing.get_args(CamMethod))  # choices come from the types that define them, never retyped
ENGINES = list(typing.get_args(Engine))
SPLITS = list(typing.get_args(Split))
CROP_SOURCES = list(typing.get_args(CropSource))


def _cam_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", choices=CAM_METHODS, default="gradcam", help="class activation map method")
    parser.add_argument("--layer", help="CAM target layer, e.g. backbone.bn2; default: the backbone's last block")


def _index_and_query(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("index", metavar="INDEX", help="index folder")
    parser.add_argument("image", metavar="IMAGE", help="query image (a path)")


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


def _version() -> str:
    import importlib.metadata as md

    try:
        return md.version("carsearch")
    except md.PackageNotFoundError:  # a checkout on sys.path without an install
        return "unknown"


@dataclasses.dataclass(frozen=True)
class Command:
    """One ``carsearch`` command, all in one place: its name, its one-line help (the listing's and its own
    description), ``add_arguments`` that sets up its flags on its parser, and ``run`` that takes the parsed
    arguments and returns the exit status. A new command is a new entry in ``COMMANDS``."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# carsearch index: its flags, then what it runs
def _index_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "source",
        metavar="SOURCE",
        help="folder tree (label = sub-folder), CSV (path,label[,x1,y1,x2,y2]) or dataset root; "
        "a folder or CSV may be a URI (s3://bucket/cars/, gs://...)",
    )
    p.add_argument("--out", required=True, metavar="INDEX", help="index folder (created; re-running resumes)")
    p.add_argument("--raw", action="store_true", help="no detector: embed whole images")
    p.add_argument(
        "--crop-source",
        choices=CROP_SOURCES,
        help="gt: the CSV/devkit boxes where present; default detector",
    )
    p.add_argument("--split", choices=SPLITS, default="all", help="devkit/Kaggle split")
    p.add_argument("--where", action="append", default=[], metavar="COLUMN=VALUE", help="CSV row filter (repeatable)")
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--batch-size", type=positive_int, help="images decoded and detected together; default 32")
    p.add_argument(
        "--workers", type=non_negative_int, help="decode worker processes (0 = in the main process); default 2"
    )
    p.add_argument("--prune", action="store_true", help="drop indexed images the source no longer lists")
    p.add_argument("--engine", choices=ENGINES, default="local", help="ray: Ray Data actors (extra [ray])")
    p.add_argument("--ray-address", help="existing Ray cluster (e.g. auto, ray://head:10001); default: a local one")
    p.add_argument("--ray-cpus", type=positive_int, help="CPUs of the local Ray cluster; default: all cores")
    p.add_argument(
        "--ray-actors",
        metavar="D,E",
        help="detector, embedder actors; default: together three quarters of the CPUs, at least 1 each (one "
        "embedder per GPU)",
    )
    p.add_argument(
        "--ray-gpus-per-actor", type=positive_float, help="GPUs per embedder actor; default 1 when GPUs exist"
    )
    p.add_argument(
        "--flip", action="store_true", help="flip test-time augmentation (mean of image and mirror); queries follow"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _common(p, config=PIPELINE_YAML, models=NEW_DETECTOR)


def _refuse_ignored_index_flags(args: argparse.Namespace) -> None:
    """Flags ``index`` would ignore in this combination are refused (docs/cli.md)."""
    if args.raw:
        given = [
            flag
            for flag, value in (("--detector-weights", args.detector_weights), ("--crop-source", args.crop_source))
            if value
        ]
        if given:
            raise ConfigError(f"--raw embeds whole images without a detector: drop {' and '.join(given)}")
    ray_flags = ("ray_address", "ray_cpus", "ray_actors", "ray_gpus_per_actor")
    given = ["--" + flag.replace("_", "-") for flag in ray_flags if getattr(args, flag) is not None]
    if given and args.engine != "ray":
        raise ConfigError(f"{', '.join(given)} apply to --engine ray only; add --engine ray or drop them")
    if args.ray_address is not None and args.ray_cpus is not None:
        raise ConfigError("--ray-cpus sizes the local Ray cluster; with --ray-address the cluster has its own")


def _cmd_index(args: argparse.Namespace) -> int:
    from carsearch.index.manifest import MANIFEST
    from carsearch.pipeline import Pipeline

    _refuse_ignored_index_flags(args)
    if (Path(args.out) / MANIFEST).exists():  # adding to an index: its own settings, explicit conflicts refused
        pipeline = Pipeline.for_update(args.out, args.config, _overrides(args))
    else:
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

    pools: Sequence[tuple[int, int] | None] = [None, None]
    if args.ray_actors:
        try:
            counts = [(int(n), int(n)) for n in args.ray_actors.split(",")]
        except ValueError:
            raise ConfigError(f"--ray-actors takes D,E (two counts), got {args.ray_actors!r}") from None
        if len(counts) != 2 or min(min(p) for p in counts) < 1:
            raise ConfigError(f"--ray-actors takes D,E (two counts >= 1), got {args.ray_actors!r}")
        pools = counts
    return RayOptions(args.ray_address, args.ray_cpus, pools[0], pools[1], args.ray_gpus_per_actor)


# carsearch search: its flags, then what it runs
def _search_arguments(p: argparse.ArgumentParser) -> None:
    _index_and_query(p)
    p.add_argument("-k", type=positive_int, default=10, help="results")
    p.add_argument("--exclude-self", action="store_true", help="drop gallery items with the query's exact bytes")
    p.add_argument("--rerank", metavar="METHODS", help=RERANK_HELP)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    _common(p, models=INDEX_DETECTOR, set_help=FROM_INDEX)


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


# carsearch evaluate: its flags, then what it runs
def _evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("index", metavar="INDEX", help="index folder")
    p.add_argument("--rerank", metavar="METHODS", help=RERANK_HELP + "; reports plain and post-processed metrics")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    _common(p, config=INDEX_YAML, set_help=SEARCH_ONLY)


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
    columns: list[tuple[str, RetrievalMetrics | None]] = []
    for tag, result in (("", evaluation), (f" + {methods}", reranked)):
        if result is None:
            continue
        columns.append((f"all{tag}", result.metrics))
        for name, group in (("seen", result.seen), ("unseen", result.unseen)):
            if group is not None and group.classes:
                columns.append((f"{name} ({group.classes} classes){tag}", group.metrics))

    def recall_at(k: int) -> Callable[[RetrievalMetrics], float]:
        return lambda r: r.recall_at[k]

    rows = [(f"Recall@{k}", recall_at(k)) for k in m.recall_at]
    rows += [("MAP@R", lambda r: r.map_at_r), ("R-Prec", lambda r: r.r_precision)]
    widths = [max(8, len(title)) for title, _ in columns]
    print(f"{'':<10}" + "  ".join(f"{title:>{w}}" for (title, _), w in zip(columns, widths, strict=True)))
    for name, value in rows:
        cells = [f"{value(r):>{w}.4f}" if r else f"{'–':>{w}}" for (_, r), w in zip(columns, widths, strict=True)]
        print(f"{name:<10}" + "  ".join(cells))
    if m.other_year_share is not None:
        print(f"wrong top-1 that is the same make/model in another year: {m.other_year_share:.4f}")
    print(f"note: {evaluation.verdict}")


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from carsearch.index import GalleryIndex
    from carsearch.pipeline import evaluate_index

    config = _search_config(args)
    gallery = GalleryIndex.load(args.index, config.index)
    evaluation = evaluate_index(gallery)
    reranked = None if config.retrieval.plain else evaluate_index(gallery, config.retrieval)
    if args.json:
        extra = {"reranked": reranked.to_dict(), "retrieval": to_dict(config.retrieval)} if reranked else {}
        print(json.dumps({**evaluation.to_dict(), **extra}, indent=2))
        return 0
    _print_metrics(evaluation, reranked, args.rerank or "post-processed")
    return 0


# carsearch audit: its flags, then what it runs
def _audit_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("index", metavar="INDEX", help="index folder")
    p.add_argument("-k", type=positive_int, default=10, help="neighbours considered per item")
    p.add_argument(
        "--max-agree", type=share, default=0.2, help="flag items with at most this share of agreeing neighbours"
    )
    p.add_argument("--near", type=similarity, default=0.995, help="cosine similarity that counts as a near duplicate")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _common(p, config=INDEX_YAML, set_help=SEARCH_ONLY)


def _cmd_audit(args: argparse.Namespace) -> int:
    from carsearch.index import GalleryIndex
    from carsearch.pipeline.audit import audit_index

    gallery = GalleryIndex.load(args.index, _search_config(args).index)
    report = audit_index(gallery, k=args.k, max_agree=args.max_agree, near=args.near)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    print(f"{len(report.duplicates)} duplicate pairs with different labels:")
    for pair in report.duplicates:
        print(
            f"  [{pair.kind} {pair.similarity:.4f}] {pair.path_a} ({pair.label_a})  <->  {pair.path_b} ({pair.label_b})"
        )
    print(f"{len(report.disagreements)} items whose {report.k} nearest neighbours mostly carry another label:")
    for d in report.disagreements[:50]:
        print(f"  {d.path}  label {d.label!r}, {d.agree:.0%} agree; {d.majority_share:.0%} say {d.majority_label!r}")
    if len(report.disagreements) > 50:
        print(f"  … {len(report.disagreements) - 50} more (use --json for all)")
    return 0


# carsearch explain: its flags, then what it runs
def _explain_arguments(p: argparse.ArgumentParser) -> None:
    _index_and_query(p)
    p.add_argument("--top", type=positive_int, default=3, help="results to explain")
    p.add_argument("--out", required=True, help=OUT + " for query.png, pair_NN.png, topk.png, explain.json")
    p.add_argument("--box", help="the car's box in the query, x1,y1,x2,y2; default: the detector's")
    p.add_argument("--exclude-self", action="store_true", help="skip gallery items with the query's exact bytes")
    p.add_argument("--redact", action="store_true", help="draw the CAMs on grey, not on the photos (shareable)")
    _cam_options(p)
    _common(p, models=INDEX_DETECTOR, set_help=FROM_INDEX)


def _cmd_explain(args: argparse.Namespace) -> int:
    from carsearch.pipeline import Pipeline
    from carsearch.pipeline.cam_jobs import explain_query, save_explanation

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


ATTENTION_INPUTS = {"both": (False, True), "whole": (False,), "crop": (True,)}  # --inputs: crop or not, per pass


# carsearch attention: its flags, then what it runs
def _attention_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "source", metavar="SOURCE", help="CSV with boxes (path,label,x1,y1,x2,y2), folder, devkit or Kaggle root"
    )
    p.add_argument(
        "--inputs", choices=list(ATTENTION_INPUTS), default="both",
        help="whole photos, crops pasted back into the photo, or both",
    )  # fmt: skip
    p.add_argument(
        "--crop-source",
        choices=CROP_SOURCES,
        help="crops from the detector or gt boxes; default detector",
    )
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--split", choices=SPLITS, default="all", help="devkit/Kaggle split")
    p.add_argument("--where", action="append", default=[], metavar="COLUMN=VALUE", help="CSV row filter (repeatable)")
    p.add_argument("--limit", type=positive_int, help="first N images only; default all")
    p.add_argument("--out", help=OUT + " for attention.json and attention.png; default: print only")
    p.add_argument("--batch-size", type=positive_int, default=8, help="images per CAM forward/backward")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    _cam_options(p)
    _common(p, config=PIPELINE_YAML, models=NEW_DETECTOR)


def _cmd_attention(args: argparse.Namespace) -> int:
    from carsearch.data.atomic import atomic_write_json
    from carsearch.data.sources import read_source
    from carsearch.explain.render import attention_plot
    from carsearch.pipeline import Pipeline
    from carsearch.pipeline.cam_jobs import attention_dataset

    pipeline = Pipeline.from_config(args.config, _overrides(args))
    items = read_source(args.source, args.split, _where(args.where))[: args.limit]
    modes = ATTENTION_INPUTS[args.inputs]
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


# carsearch demo: its flags, then what it runs
def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("index", metavar="INDEX", help="index folder (usually built with cropping)")
    p.add_argument(
        "--raw-index", metavar="INDEX", help="a second index of the same images, built with --raw: shown side by side"
    )
    p.add_argument(
        "--model",
        help="the embedder the index(es) were built with, where the manifest's path no longer finds it; "
        "default: each index's own",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1: this machine only)")
    p.add_argument("--port", type=port_number, default=7860, help="port to listen on")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (needs internet)")
    p.add_argument("--method", choices=CAM_METHODS, default="gradcam", help="class activation map method")
    p.add_argument("--rerank", metavar="METHODS", help=RERANK_HELP)
    _common(p, models=INDEX_DETECTOR, set_help=FROM_INDEX)


def _cmd_demo(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported
    from carsearch.demo.app import launch
    from carsearch.demo.handlers import DemoBackend

    overrides = [o for o in _overrides(args) if not o.startswith("embedder.model=")]
    backend = DemoBackend.load(args.index, args.raw_index, args.model, overrides, args.method)
    print(f"carsearch demo: http://{args.host}:{args.port} (index {args.index}; Ctrl+C stops)")
    launch(backend, args.host, args.port, args.share)
    return 0


# carsearch compare: its flags, then what it runs
def _compare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        metavar="CONFIG",
        help="experiment config: a shipped name (compare) or a YAML path; defaults without it",
    )
    p.add_argument("--out", required=True, help=OUT + "; re-running reuses finished stages")
    p.add_argument("--quick", action="store_true", help="a small subset (6+6 classes, 1 short epoch) in a few minutes")
    add_set_option(p, "e.g. --set train.overrides=[trainer.max_epochs=5]")
    p.add_argument("--device", type=device_name, help=DEVICE_HELP)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _cmd_compare(args: argparse.Namespace) -> int:
    from carsearch.compare import compare, load_compare_config

    logging.getLogger("carsearch").setLevel(logging.INFO)
    overrides = [*args.overrides, *([f"device={args.device}"] if args.device else [])]
    config = load_compare_config(args.config, overrides, quick=args.quick)
    command = "carsearch " + " ".join(shlex.quote(a) for a in args.argv)
    paths = compare(config, args.out, command=command)
    print(f"report: {paths['md']} (and {paths['html'].name}, {paths['json'].name})")
    return 0


# carsearch train: its flags, then what it runs
def _train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        metavar="CONFIG",
        help="training recipe: a shipped name (cpu_quick, cpu_full, ...) or a YAML path; defaults without it",
    )
    add_set_option(p, "e.g. --set trainer.max_epochs=5")
    p.add_argument(
        "--device",
        type=device_name,
        help="auto, cpu, cuda (every visible GPU), cuda:N; default: the recipe's trainer.accelerator",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _cmd_train(args: argparse.Namespace) -> int:
    from carsearch.embedder.training import load_train_config, train
    from carsearch.embedder.training.run import device_overrides

    logging.getLogger("carsearch").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if args.device not in (None, "auto"):
        from carsearch.runtime.device import resolve_device

        resolve_device(args.device)  # a device this machine lacks: one line, before any data is read
    run_dir = train(load_train_config(args.config, [*args.overrides, *device_overrides(args.device)]))
    if int(os.environ.get("LOCAL_RANK", "0") or 0) == 0:  # DDP ranks > 0 re-run the command: rank 0 prints
        print(run_dir)
    return 0


# carsearch export: its flags, then what it runs
def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "run_dir", nargs="?", metavar="RUN", help="a run folder written by carsearch train; default: --model's model"
    )
    p.add_argument(
        "--out", required=True, metavar="FILE", help="file to write: FILE.pt (use it with --model FILE) or FILE.onnx"
    )
    p.add_argument("--format", choices=["pt", "onnx"], help="default: onnx for a .onnx FILE, else pt")
    p.add_argument(
        "--embedding",
        choices=["head", "pooled"],
        help="embed with the head's output or the pooled features before it; default: the run's choice",
    )
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"without RUN: the model to export, a name ({', '.join(MODELS)}) or a path",
    )
    p.add_argument(
        "--half",
        action="store_true",
        help="float16 weights (half the file; refused if an embedding moves by more than 1e-3)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _cmd_export(args: argparse.Namespace) -> int:
    from carsearch.embedder.training import export

    logging.getLogger("carsearch").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if args.embedding and args.run_dir is None:
        raise ConfigError("--embedding needs a run folder")
    if args.run_dir is not None and args.model != DEFAULT_MODEL:
        raise ConfigError("--model names the model to export when no run folder is given")
    fmt = args.format or ("onnx" if str(args.out).endswith(".onnx") else "pt")
    print(export(args.run_dir, args.out, fmt, args.embedding, half=args.half, model_name=args.model))
    return 0


# carsearch config: its flags, then what it runs
def _config_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="CONFIG", help="a shipped name or a YAML path; default: the pipeline defaults")
    add_set_option(p, "e.g. --set embedder.model=imagenet")
    p.add_argument("--list", action="store_true", help="list the shipped configs instead")


def _cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from carsearch.config_files import config_names, resolve_config

    if args.list:
        for name, path in config_names().items():
            print(f"{name:<18} {_config_class(yaml.safe_load(path.read_text()) or {}).__name__:<15} {path}")
        return 0
    data = yaml.safe_load(resolve_config(args.config).read_text()) or {} if args.config else {}
    config = load_dataclass(_config_class(data), args.config, args.overrides)
    print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
    return 0


def _config_class(data: dict[str, Any]) -> type[Any]:
    """The config dataclass whose sections a YAML mapping uses: pipeline, training recipe or compare experiment."""
    from carsearch.compare.config import CompareConfig
    from carsearch.embedder.training.config import TrainConfig

    for cls in (PipelineConfig, TrainConfig, CompareConfig):  # the first whose sections hold every key
        if isinstance(data, dict) and set(data) <= {f.name for f in dataclasses.fields(cls)}:
            return cls
    return PipelineConfig  # whose loader names the unknown keys


# carsearch models: its flags, then what it runs
def _models_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", metavar="MODEL", help="one model: a shipped name or a checkpoint path")
    p.add_argument("--classes", action="store_true", help="print MODEL's training classes, one per line")


def _cmd_models(args: argparse.Namespace) -> int:
    if args.classes:
        from carsearch.embedder.checkpoint import read_checkpoint, train_labels
        from carsearch.embedder.zoo import IMAGENET, shipped_checkpoint

        if args.model is None:
            raise ConfigError("--classes needs a MODEL, e.g. carsearch models cars98-lite1-320 --classes")
        if args.model == IMAGENET:
            raise ConfigError("imagenet is the pretrained backbone: it was trained on no car classes")
        source = shipped_checkpoint(args.model) if args.model in MODELS else (args.model, None)
        labels = train_labels(read_checkpoint(*source))
        if labels is None:
            raise ConfigError(f"{args.model} does not record the classes it was trained on")
        print("\n".join(labels))
        return 0
    if args.model is not None and args.model not in MODELS:
        raise ConfigError(f"no shipped model {args.model!r}; shipped: {', '.join(MODELS)}")
    shown = [MODELS[args.model]] if args.model else list(MODELS.values())
    print(f"{'name':<18} {'backbone':<22} {'input':>5} {'dim':>5} {'classes':>7}  note")
    for m in shown:
        name = m.name + (" *" if m.name == DEFAULT_MODEL else "")
        print(f"{name:<18} {m.backbone:<22} {m.input_size:>5} {m.dim:>5} {m.train_classes:>7}  {m.note}")
    if args.model:
        print(MODELS[args.model].summary)
    print(
        "* the default. Training classes: carsearch models NAME --classes. A path or URI from carsearch export "
        "is also a model."
    )
    return 0


# carsearch help: its flags, then what it runs
def _help_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("topic", nargs="?", metavar="COMMAND", help="a command; default: all commands")


def _cmd_help(args: argparse.Namespace) -> int:
    """Print the help of ``args.topic`` (a command) or of carsearch; an unknown topic is a usage error."""
    topic = getattr(args, "topic", None)
    names = [command.name for command in COMMANDS if command.name != "help"]
    if topic is not None and topic not in names and topic != "help":
        args.parser.error(f"no command {topic!r}; commands: {', '.join(names)}")
    (_subparsers(args.parser)[topic] if topic else args.parser).print_help()
    return 0


COMMANDS: tuple[Command, ...] = (  # in the order of 'carsearch --help'
    Command("index", "crop and index a folder / CSV / Stanford devkit / Kaggle dataset", _index_arguments, _cmd_index),
    Command("search", "top-k gallery cars for a query image", _search_arguments, _cmd_search),
    Command(
        "evaluate",
        "leave-one-out Recall@k, MAP@R, R-Precision of a labelled index (seen / unseen classes)",
        _evaluate_arguments,
        _cmd_evaluate,
    ),
    Command(
        "audit",
        "relabelling candidates: neighbours disagree, duplicates labelled differently",
        _audit_arguments,
        _cmd_audit,
    ),
    Command(
        "explain",
        "GradCAM overlays for a query's top results (and its attention-in-box)",
        _explain_arguments,
        _cmd_explain,
    ),
    Command(
        "attention",
        "attention-in-box over a dataset: how much CAM energy falls on the car",
        _attention_arguments,
        _cmd_attention,
    ),
    Command("demo", "the Gradio web demo over an index (binds to 127.0.0.1)", _demo_arguments, _cmd_demo),
    Command(
        "compare",
        "the cropped-vs-raw experiment as a report (report.md, report.html, results.json)",
        _compare_arguments,
        _cmd_compare,
    ),
    Command(
        "train", "fine-tune an embedder on class-disjoint splits; prints the run folder", _train_arguments, _cmd_train
    ),
    Command(
        "export",
        "write a training run's model (or a named model) for indexing: a checkpoint or ONNX",
        _export_arguments,
        _cmd_export,
    ),
    Command(
        "config",
        "print the effective configuration (a pipeline, training or compare config) as YAML",
        _config_arguments,
        _cmd_config,
    ),
    Command(
        "models",
        "the shipped embedders: name, backbone, input size, dimension, training classes, figures",
        _models_arguments,
        _cmd_models,
    ),
    Command("help", "show the help of carsearch or of one command", _help_arguments, _cmd_help),
)


def build_parser() -> argparse.ArgumentParser:
    """The ``carsearch`` parser: one sub-parser per entry of ``COMMANDS``, in its order, set up by the entry's
    ``add_arguments``. Builds without importing torch, faiss or a model library, so help stays fast."""
    parser = _Parser(
        prog="carsearch",
        description="Detect-then-embed car image retrieval: YOLO crops the car, a metric-learning embedder "
        "embeds the crop, faiss finds the nearest cars, GradCAM shows where the model looked.",
        epilog="Run 'carsearch COMMAND --help' (or 'carsearch help COMMAND') for a command's flags.",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"carsearch {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.help, formatter_class=_Formatter)
        command.add_arguments(p)
    return parser


def command_parsers() -> dict[str, argparse.ArgumentParser]:
    """Every command's parser by name, ``help`` left out."""
    return {name: parser for name, parser in _subparsers(build_parser()).items() if name != "help"}


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The sub-parsers of a parser from ``build_parser``, by command name."""
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return subs.choices


def flags_markdown() -> str:
    """docs/cli.md's table of every command's arguments and flags, generated from the parsers."""
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
                positional.append(f"[{meta}]" if action.nargs == "?" else str(meta))
        lines.append(f"| `carsearch {name}` | {' '.join(positional) or '–'} | {', '.join(flags)} |")
    return "\n".join(lines)


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``parse_args``, but unknown arguments are refused by the command's own parser, with a hint for a bare
    override (``detector.confidence=0.3`` → ``did you mean --set detector.confidence=0.3?``)."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        where = _subparsers(parser).get(args.command, parser) if args.command else parser
        bare = [a for a in extra if "=" in a and not a.startswith("-") and "." in a.partition("=")[0]]
        hint = f"; did you mean {' '.join(f'--set {a}' for a in bare)}?" if bare else ""
        where.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    return args


def _no_space(args: argparse.Namespace, exc: OSError) -> str:
    """The one-line message for a full disk: what was being written, and that re-running resumes."""
    out = getattr(args, "out", None)
    target = exc.filename or (f"{out}/…" if out else "the output")
    kept = f"; finished chunks are kept in {Path(out) / 'work'}" if args.command == "index" and out else ""
    return f"no space left on device while writing {target}{kept} — free space and re-run to resume"


def main(argv: list[str] | None = None) -> int:
    """Run one command (``sys.argv`` by default) and return its exit status: 0 done, 2 an error of the user's
    (one line on stderr; argparse exits 2 itself on a usage error), 130 interrupted, 141 the reader of stdout
    went away. Other errors raise."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = _parse(parser, argv)
    args.command = args.command or "help"  # no command: the help of them all
    args.argv, args.parser = argv, parser  # compare records the command line; help prints this parser's help
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    run = next(command.run for command in COMMANDS if command.name == args.command)
    try:
        code = run(args)
        sys.stdout.flush()  # a reader that went away (`| head`) shows here, not as a traceback at exit
        return code
    except BrokenPipeError:  # the Python docs' "Note on SIGPIPE": stop writing, end as if killed by SIGPIPE
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except CarSearchError as exc:
        print(f"carsearch {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        print(f"carsearch {args.command}: error: {_no_space(args, exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"carsearch {args.command}: interrupted; finished work is saved — re-run to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
