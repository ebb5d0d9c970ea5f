"""Issue 10's reference fine-tuning loop in plain PyTorch: an independent check of ``carsearch train``.

    python benchmarks/reference_loop.py --schedule 20 --run 8 --eval-at 4,8

Squash every crop to 256² (PIL bicubic, uint8 in RAM) → ``RandomResizedCrop(224, scale=(0.6, 1))`` + flip;
offline ``tf_efficientnet_lite0`` with stem + blocks 0–1 frozen and every BatchNorm in eval mode; a 512-d
linear head (kaiming); ProxyAnchor (margin 0.1, α 32); AdamW (backbone 1e-4, head 1e-3, proxies 1e-2,
weight decay 1e-4), grad-norm clip 10; PK batches 16 × 4; epoch 1 trains head + proxies only, then cosine
decay over ``--schedule`` epochs, of which ``--run`` are run. Half split of the shared crops: the first 49
sorted classes train; the other 49 are tested (leave-one-out; inputs squashed to 224² with PIL) after
the epochs in ``--eval-at``, on the pooled 1280-d features and on the 512-d head. This mirrors the issue's
table, which evaluated mid-schedule checkpoints on the test classes: a diagnostic, not a reported result
(nothing is selected on those classes). Writes ``benchmarks/results/reference_loop.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pytorch_metric_learning import losses, samplers
from torch import nn
from torchvision.transforms import v2

from carsearch.embedder.backbones import create_backbone
from carsearch.metrics import leave_one_out_metrics

ROOT = Path(__file__).resolve().parents[1]


def load_squashed(root: Path, rows: list[dict[str, str]], size: int) -> torch.Tensor:
    """(N, 3, size, size) uint8: each crop squashed with PIL bicubic."""
    images = [np.asarray(Image.open(root / r["path"]).convert("RGB").resize((size, size), Image.BICUBIC)) for r in rows]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/stanford_cars"))
    parser.add_argument("--schedule", type=int, default=20, help="epochs of the cosine schedule")
    parser.add_argument("--run", type=int, default=8, help="epochs actually run")
    parser.add_argument("--eval-at", default="4,8", help="comma-separated epochs after which to test")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=str(ROOT / "benchmarks/results/reference_loop.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    eval_at = {int(e) for e in args.eval_at.split(",") if e}

    root = Path(args.data)
    rows = list(csv.DictReader(open(root / "crops.csv")))
    labels = sorted({r["label"] for r in rows})
    train_classes, test_classes = labels[:49], labels[49:]
    train_rows = [r for r in rows if r["label"] in train_classes]
    test_rows = [r for r in rows if r["label"] in test_classes]
    x_train = load_squashed(root, train_rows, 256)
    y_train = torch.tensor([train_classes.index(r["label"]) for r in train_rows])
    x_test, y_test = load_squashed(root, test_rows, 224), [r["label"] for r in test_rows]
    normalise = [v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.5] * 3)]
    augment = v2.Compose(
        [v2.RandomResizedCrop(224, scale=(0.6, 1.0), antialias=True), v2.RandomHorizontalFlip(), *normalise]
    )
    plain = v2.Compose(normalise)

    backbone = create_backbone("tf_efficientnet_lite0", pretrained=True)
    head = nn.Linear(1280, 512)
    nn.init.kaiming_normal_(head.weight)
    nn.init.zeros_(head.bias)
    for module in (backbone.conv_stem, backbone.bn1, backbone.blocks[0], backbone.blocks[1]):
        module.requires_grad_(False)
    backbone = backbone.to(memory_format=torch.channels_last)

    def set_train() -> None:
        backbone.train()
        head.train()
        for module in backbone.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()

    criterion = losses.ProxyAnchorLoss(num_classes=49, embedding_size=512, margin=0.1, alpha=32)
    backbone_params = [p for p in backbone.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(
        [
            {"params": backbone_params, "lr": 1e-4},
            {"params": head.parameters(), "lr": 1e-3},
            {"params": criterion.parameters(), "lr": 1e-2},
        ],
        weight_decay=1e-4,
    )
    per_epoch = len(train_rows) // 64
    total = args.schedule * per_epoch

    def multiplier(step: int) -> float:
        if step < per_epoch:
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * (step - per_epoch) / (total - per_epoch)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, multiplier)
    sampler = samplers.MPerClassSampler(y_train.numpy(), m=4, batch_size=64, length_before_new_iter=per_epoch * 64)

    def pooled(x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        return torch.cat([backbone.forward_features(chunk).mean((2, 3)) for chunk in x.split(16)])

    @torch.no_grad()
    def evaluate() -> dict[str, list[float]]:
        backbone.eval()
        head.eval()
        features = torch.cat([pooled(plain(x_test[i : i + 64])) for i in range(0, len(x_test), 64)])
        out = {}
        for name, emb in (("pooled", F.normalize(features, dim=1)), ("head", F.normalize(head(features), dim=1))):
            m = leave_one_out_metrics(emb.numpy(), y_test)
            out[name] = [round(100 * m.recall_at[1], 1), round(100 * m.map_at_r, 2)]
        set_train()
        return out

    set_train()
    history = []
    for epoch in range(args.run):
        for parameter in backbone_params:
            parameter.requires_grad_(epoch >= 1)
        order, start, total_loss = list(iter(sampler)), time.time(), 0.0
        for b in range(per_epoch):
            ids = torch.tensor(order[b * 64 : (b + 1) * 64])
            x = torch.stack([augment(x_train[i]) for i in ids])
            loss = criterion(F.normalize(head(pooled(x)), dim=1), y_train[ids])
            optimiser.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_([*backbone_params, *head.parameters(), *criterion.parameters()], 10.0)
            optimiser.step()
            scheduler.step()
            total_loss += loss.item()
        row: dict[str, object] = {
            "epoch": epoch + 1,
            "loss": round(total_loss / per_epoch, 3),
            "s": round(time.time() - start, 1),
        }
        if epoch + 1 in eval_at:
            row["test R@1, MAP@R"] = evaluate()
        history.append(row)
        print(json.dumps(row), flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"args": vars(args), "history": history}, indent=2) + "\n")


if __name__ == "__main__":
    main()
