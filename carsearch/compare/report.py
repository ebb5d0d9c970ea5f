"""The experiment's report: charts, example grids, ``report.md``, a self-contained ``report.html``, ``results.json``."""

from __future__ import annotations

import base64
import html
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from carsearch.compare.config import CompareConfig
from carsearch.compare.experiment import EMBEDDERS, INPUTS, CompareResults, crop_for
from carsearch.config_files import to_dict
from carsearch.data.atomic import atomic_write_bytes, atomic_write_json
from carsearch.data.images import load_image
from carsearch.embedder.training.config import load_train_config
from carsearch.explain import Explainer
from carsearch.explain.render import PairView, hstack, pair_panel, vstack

if TYPE_CHECKING:
    from carsearch.explain.cam import Method

SELECTION = {"map_at_r": "MAP@R", "recall_at_1": "Recall@1"}


EMBED_WITH = {
    "head": "the head's output",
    "pooled": "the pooled backbone features before the head",
    "auto": "the head's output or the pooled features, whichever scores higher on validation",
}


def _selection(config: CompareConfig) -> str:
    """How the fine-tuning recipe picks its epoch, in words (``trainer.select``)."""
    select = load_train_config(config.train.recipe, list(config.train.overrides)).trainer.select
    if select == "last":
        return "the last epoch kept (validation recorded)"
    return f"the epoch with the best validation {SELECTION[select]} picked"


def _embedding(config: CompareConfig) -> str:
    """What the fine-tuned models embed with, in words (``model.embed_with``)."""
    embed_with = load_train_config(config.train.recipe, list(config.train.overrides)).model.embed_with
    return f"the fine-tuned models embed with {EMBED_WITH[embed_with]} (`model.embed_with={embed_with}`)"


NAMES = {
    "zero_shot": "pretrained backbone (zero-shot)",
    "ft_raw": "fine-tuned on raw photos",
    "ft_crop": "fine-tuned on detector crops",
}
SUBJECTS = {
    "zero_shot": "the pretrained backbone",
    "ft_raw": "the embedder fine-tuned on raw photos",
    "ft_crop": "the embedder fine-tuned on detector crops",
}
INPUT_NAMES = {"raw": "raw photo", "detector": "detector crop", "gt": "ground-truth crop"}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def retrieval_chart(results: CompareResults, path: Path) -> Path:
    """Grouped bars: Recall@1 per embedder (group) and input (bar)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
    width = 0.26
    for j, mode in enumerate(INPUTS):
        values = [results.retrieval[name][mode]["recall_at_1"] * 100 for name in EMBEDDERS]
        bars = ax.bar(np.arange(len(EMBEDDERS)) + (j - 1) * width, values, width, label=INPUT_NAMES[mode])
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(
        range(len(EMBEDDERS)), [NAMES[n].replace(" (", "\n(").replace(" on ", "\non ") for n in EMBEDDERS], fontsize=8
    )
    ax.set_ylabel("Recall@1 (%) on test classes")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def iou_chart(results: CompareResults, confidence: float, path: Path) -> Path:
    """Histogram of the chosen box's IoU with the ground truth at the crop confidence."""
    plt = _plt()
    stats = results.detector_quality["thresholds"][f"{confidence:g}"]
    fig, ax = plt.subplots(figsize=(6, 3), dpi=100)
    ax.bar(np.arange(10) / 10 + 0.05, stats["iou_histogram"], width=0.09)
    ax.set_xlabel(f"IoU of the detector's chosen box with the ground truth (confidence ≥ {confidence:g})")
    ax.set_ylabel("photos")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def attention_chart(results: CompareResults, path: Path) -> Path:
    """Mean attention-in-box per embedder on raw test photos, with the uniform-map level."""
    plt = _plt()
    att = results.attention
    fig, ax = plt.subplots(figsize=(6, 3), dpi=100)
    bars = ax.bar(range(len(EMBEDDERS)), [att[n]["mean"] for n in EMBEDDERS], color="tab:green")
    ax.bar_label(bars, fmt="%.2f", fontsize=8)
    chance = att["zero_shot"]["chance"]
    if isinstance(chance, float) and not math.isnan(chance):
        ax.axhline(chance, color="grey", linestyle=":", label=f"uniform map ({chance:.2f})")
        ax.legend(fontsize=8)
    ax.set_xticks(
        range(len(EMBEDDERS)), [NAMES[n].replace(" (", "\n(").replace(" on ", "\non ") for n in EMBEDDERS], fontsize=8
    )
    ax.set_ylim(0, 1)
    ax.set_ylabel("CAM energy inside the car box")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _grey(image: Any) -> Any:
    from PIL import Image

    return Image.new("RGB", image.size, (128, 128, 128))


def example_grid(config: CompareConfig, results: CompareResults, which: str, path: Path) -> Path | None:
    """Rows: the query's raw-photo match (CAMs) | the query's crop match (CAMs), zero-shot embedder."""
    indices = results.examples[which]
    if not indices:
        return None
    split, dets = results.photos, results.test_detections
    explainer = Explainer(results.zero_shot, cast("Method", config.attention.method))  # EmbeddingCAM checks it
    rows = []
    for i in indices:
        views = []
        for mode, top in (("raw", results.top1["raw"][i]), ("detector", results.top1["detector"][i])):
            q_item, r_item = split.test[i], split.test[top]
            query, _ = crop_for(config, mode, load_image(q_item.path), q_item, dets[i])
            result, _ = crop_for(config, mode, load_image(r_item.path), r_item, dets[top])
            q_map, r_map, score = explainer.pair(query, result)
            box = q_item.box.clip(*query.size) if mode == "raw" else None
            if config.redact:
                query, result = _grey(query), _grey(result)
            views.append(
                PairView(
                    query, q_map, result, r_map, score, 1, q_item.label, r_item.label, box, title=INPUT_NAMES[mode]
                )
            )
        rows.append(hstack([pair_panel(v, photos=not config.redact) for v in views], gap=24))
    grid = vstack(rows, gap=12)
    grid.save(path)
    return path


def _cell(metrics: dict[str, float]) -> str:
    return f"{metrics['recall_at_1'] * 100:.1f} / {metrics['recall_at_4'] * 100:.1f} / {metrics['map_at_r'] * 100:.2f}"


def _table(header: list[str], rows: list[list[str]]) -> list[list[str]]:
    return [header, *rows]


def _conclusion(results: CompareResults) -> str:
    r = results.retrieval
    z = r["zero_shot"]
    lines = []
    for name in EMBEDDERS:
        raw, det, gt = (r[name][m]["recall_at_1"] * 100 for m in INPUTS)
        verdict = "helps" if det > raw + 0.5 else ("hurts" if det < raw - 0.5 else "makes no real difference")
        lines.append(
            f"With {SUBJECTS[name]}, cropping by the detector {verdict}: Recall@1 {raw:.1f}% on raw photos vs "
            f"{det:.1f}% on detector crops ({gt:.1f}% on ground-truth crops)."
        )
    best = max(((n, m) for n in EMBEDDERS for m in INPUTS), key=lambda nm: r[nm[0]][nm[1]]["recall_at_1"])
    lines.append(
        f"Best cell: {NAMES[best[0]]} on {INPUT_NAMES[best[1]]} inputs "
        f"({r[best[0]][best[1]]['recall_at_1'] * 100:.1f}%); "
        f"zero-shot on raw photos: {z['raw']['recall_at_1'] * 100:.1f}%."
    )
    att = results.attention
    lines.append(
        "Attention-in-box on raw photos (share of CAM energy on the car): "
        + ", ".join(f"{NAMES[n]} {att[n]['mean']:.2f}" for n in EMBEDDERS)
        + f" (a uniform map: {att['zero_shot']['chance']:.2f})."
    )
    counts = results.examples["counts"]
    lines.append(
        f"Zero-shot top-1 on the test photos: the crop fixes {counts['crop_right_raw_wrong']} raw mistakes and "
        f"breaks {counts['raw_right_crop_wrong']} raw successes ({counts['both_right']} right both ways, "
        f"{counts['both_wrong']} wrong both ways)."
    )
    return " ".join(lines)


Block = tuple[str, Any]  # (kind, value): h1/h2/h3 and p (text), table (rows), img ((title, path)), code


def _intro(config: CompareConfig, results: CompareResults, command: str) -> list[Block]:
    """Title, command, data and the conclusion."""
    s = results.split
    return [
        ("h1", "Cropped vs raw: what the detector buys"),
        ("p", f"Command: `{command}`. Generated by the command; not edited by hand."),
        (
            "p",
            f"Data: `{config.data.source}` where {config.data.where or 'all rows'}: {s['train_images']} photos of "
            f"{s['train_classes']} training classes, {s['test_images']} photos of {s['test_classes']} other (test) "
            f"classes; image sizes {', '.join(s['resolution'])}. Crops are cut from the same pixels as the raw photo.",
        ),
        ("h2", "Conclusion"),
        ("p", _conclusion(results)),
    ]


def _detector_section(config: CompareConfig, results: CompareResults, pictures: dict[str, Path | None]) -> list[Block]:
    """1. Detector quality: the chosen box against the ground truth per confidence threshold."""
    q = results.detector_quality
    return [
        ("h2", "1. Detector quality"),
        (
            "p",
            f"The detector's chosen vehicle box (largest, as the pipeline picks it) against the ground-truth box, "
            f"over all {q['images']} photos; detector `{Path(config.detector.weights).name}`.",
        ),
        (
            "table",
            _table(
                ["confidence ≥", "no detection", "hit IoU ≥ 0.5", "hit IoU ≥ 0.7", "mean IoU when found"],
                [
                    [
                        c,
                        f"{v['no_detection_rate']:.1%}",
                        f"{v['hit_rate_iou_0.5']:.1%}",
                        f"{v['hit_rate_iou_0.7']:.1%}",
                        f"{v['mean_iou_when_found']:.3f}",
                    ]
                    for c, v in q["thresholds"].items()
                ],
            ),
        ),
        ("img", ("IoU histogram", pictures["iou"])),
    ]


def _retrieval_section(config: CompareConfig, results: CompareResults, pictures: dict[str, Path | None]) -> list[Block]:
    """2. Retrieval: the embedder × input grid on the test classes, and how the rows were fine-tuned."""
    return [
        ("h2", "2. Retrieval on the test classes"),
        (
            "p",
            f"Leave-one-out over the {results.split['test_images']} test photos; each cell Recall@1 / Recall@4 / "
            f"MAP@R (%). Detector crops at confidence ≥ {config.detector.confidence:g} with a "
            f"{config.detector.margin:.0%} margin; "
            f"{results.test_no_detection} test photos had no detection and are embedded whole. Fine-tuning: recipe "
            f"`{config.train.recipe}` with overrides {list(config.train.overrides) or 'none'}, the same for both rows, "
            f"seed {config.seed}, {_selection(config)} on {config.train.val_share:.0%} of the training classes; "
            f"{_embedding(config)}.",
        ),
        (
            "table",
            _table(
                ["embedder \\ inputs", *(INPUT_NAMES[m] for m in INPUTS)],
                [[NAMES[n], *(_cell(results.retrieval[n][m]) for m in INPUTS)] for n in EMBEDDERS],
            ),
        ),
        ("img", ("Recall@1 by embedder and input", pictures["retrieval"])),
    ]


def _attention_section(config: CompareConfig, results: CompareResults, pictures: dict[str, Path | None]) -> list[Block]:
    """3. Attention-in-box: the share of CAM energy on the car, per embedder."""
    return [
        ("h2", "3. Attention-in-box on raw test photos"),
        (
            "p",
            f"Share of {config.attention.method} energy inside the ground-truth car box, first "
            f"{results.attention['zero_shot']['count']} test photos.",
        ),
        (
            "table",
            _table(
                ["embedder", "mean", "median", "mostly outside (< 0.5)", "uniform map"],
                [
                    [
                        NAMES[n],
                        f"{a['mean']:.3f}",
                        f"{a['median']:.3f}",
                        f"{a['share_mostly_outside']:.1%}",
                        f"{a['chance']:.3f}",
                    ]
                    for n, a in results.attention.items()
                ],
            ),
        ),
        ("img", ("Attention-in-box by embedder", pictures["attention"])),
    ]


def _examples_section(config: CompareConfig, pictures: dict[str, Path | None]) -> list[Block]:
    """4. Where it matters: the example grids of test photos whose top-1 the crop fixes or breaks."""
    blocks: list[Block] = [
        ("h2", "4. Where it matters"),
        (
            "p",
            "Zero-shot embedder. Each row: the query matched on its raw photo (query CAM with the car box in yellow, "
            "its top-1's CAM) | the same query matched on its detector crop. "
            + (
                "CAMs are drawn on grey (`redact: true`): the photos may not be redistributed." if config.redact else ""
            ),
        ),
    ]
    for key, title in (
        ("crop_wins", "Raw top-1 wrong, crop top-1 right"),
        ("raw_wins", "Raw top-1 right, crop top-1 wrong"),
    ):
        blocks.append(("h3", title))
        blocks.append(("img", (title, pictures[key])) if pictures[key] else ("p", "No such test photo."))
    return blocks


def _run_section(results: CompareResults, config_yaml: str) -> list[Block]:
    """Run: the stages (computed or cached, and their wall time), platform, versions and the config."""
    return [
        ("h2", "Run"),
        (
            "table",
            _table(
                ["stage", "this run", "wall time when computed (s)"],
                [
                    [st["stage"], st["status"], "—" if st["seconds"] is None else f"{st['seconds']:.1f}"]
                    for st in results.stages
                ],
            ),
        ),
        (
            "p",
            f"This run took {results.wall_time_s:.0f} s of wall time on {results.platform['machine']} "
            f"({results.platform['device']}), Python {results.platform['python']}; versions: "
            + ", ".join(f"{k} {v}" for k, v in results.versions.items())
            + ".",
        ),
        ("h3", "Config"),
        ("code", config_yaml),
    ]


def _blocks(
    config: CompareConfig, results: CompareResults, pictures: dict[str, Path | None], command: str, config_yaml: str
) -> list[Block]:
    """The report, section by section, as blocks that ``_md`` and ``_html`` render."""
    return [
        *_intro(config, results, command),
        *_detector_section(config, results, pictures),
        *_retrieval_section(config, results, pictures),
        *_attention_section(config, results, pictures),
        *_examples_section(config, pictures),
        *_run_section(results, config_yaml),
    ]


def _md(blocks: list[Block], root: Path) -> str:
    out = []
    for kind, value in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + value)
        elif kind == "p":
            out.append(value)
        elif kind == "table":
            out.append(
                "\n".join(
                    ["| " + " | ".join(row) + " |" for row in value[:1]]
                    + ["|" + "---|" * len(value[0])]
                    + ["| " + " | ".join(row) + " |" for row in value[1:]]
                )
            )
        elif kind == "img":
            out.append(f"![{value[0]}]({value[1].relative_to(root).as_posix()})")
        elif kind == "code":
            out.append(f"```yaml\n{value}```")
    return "\n\n".join(out) + "\n"


def _inline(text: str) -> str:
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text, quote=False))


def _html(blocks: list[Block]) -> str:
    body = []
    for kind, value in blocks:
        if kind in ("h1", "h2", "h3"):
            body.append(f"<{kind}>{html.escape(value)}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{_inline(value)}</p>")
        elif kind == "table":
            head = "".join(f"<th>{html.escape(c)}</th>" for c in value[0])
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in value[1:])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode(value[1].read_bytes()).decode()
            body.append(f'<figure><img alt="{html.escape(value[0])}" src="data:image/png;base64,{data}"></figure>')
        elif kind == "code":
            body.append(f"<pre><code>{html.escape(value)}</code></pre>")
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px}img{max-width:100%}code{background:#f4f4f4}"
    )
    head = f"<meta charset='utf-8'><title>Cropped vs raw</title><style>{style}</style>"
    return f"<!doctype html><html><head>{head}</head><body>{''.join(body)}</body></html>\n"


def write_report(config: CompareConfig, results: CompareResults, out: str | Path, command: str) -> dict[str, Path]:
    """Charts, example grids, ``report.md``, ``report.html`` (images inlined) and ``results.json`` in ``out``."""
    import yaml

    out = Path(out)
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    confidence = config.detector.confidence
    if f"{confidence:g}" not in results.detector_quality["thresholds"]:
        confidence = min(config.confidences)
    pictures: dict[str, Path | None] = {
        "iou": iou_chart(results, confidence, figures / "detector_iou.png"),
        "retrieval": retrieval_chart(results, figures / "retrieval.png"),
        "attention": attention_chart(results, figures / "attention.png"),
        "crop_wins": example_grid(config, results, "crop_right_raw_wrong", figures / "examples_crop_right.png"),
        "raw_wins": example_grid(config, results, "raw_right_crop_wrong", figures / "examples_raw_right.png"),
    }
    blocks = _blocks(config, results, pictures, command, yaml.safe_dump(to_dict(config), sort_keys=False))
    atomic_write_bytes(out / "report.md", _md(blocks, out).encode())
    atomic_write_bytes(out / "report.html", _html(blocks).encode())
    atomic_write_json(out / "results.json", results.to_dict())
    return {"md": out / "report.md", "html": out / "report.html", "json": out / "results.json"}
