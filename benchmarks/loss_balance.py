"""How strongly each loss of a combination pulls: gradient norms w.r.t. the head embeddings.

    python benchmarks/loss_balance.py --set loss.plus=proxy_anchor --set 'loss.plus_params={margin: 0.1, alpha: 32}'
    python benchmarks/loss_balance.py --run runs/levers/lite1 --set loss.plus=proxy_anchor ...

``cpu_quick`` with the ``--set`` overrides builds the model and both losses (``loss.name`` and ``loss.plus``,
the proxies freshly initialised); ``--run`` loads a trained run's backbone and head first (and its proxies
when it trained the same losses). On PK batches
(P × K of the config) of the half split's *training* classes (the first 49 sorted shared classes; the test
classes are not read), each loss's gradient norm with respect to the L2-normalised head embeddings is
printed, and their ratio: the scale on which ``loss.plus_weight`` balances the two (the optimiser, AdamW,
follows the summed gradient's direction, so the larger term leads).
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from carsearch.data.images import load_image  # noqa: E402
from carsearch.data.sources import read_source  # noqa: E402
from carsearch.embedder.preprocessing import eval_transform  # noqa: E402
from carsearch.embedder.training.config import load_train_config  # noqa: E402
from carsearch.embedder.training.data import sort_classes  # noqa: E402
from carsearch.embedder.training.module import EmbedderModule  # noqa: E402
from carsearch.embedder.training.run import model_spec  # noqa: E402

SOURCE = ROOT.parent / "shared" / "data" / "stanford_cars" / "crops.csv"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a cpu_quick override")
    parser.add_argument("--run", type=Path, help="a training run folder: its last checkpoint is loaded")
    parser.add_argument("--batches", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)  # a diagnostic beside a training run; a few batches
    config = load_train_config("cpu_quick", args.set)
    if config.loss.plus is None:
        parser.error("set loss.plus: there is nothing to balance")
    items = read_source(SOURCE)
    classes = sort_classes([str(it.label) for it in items])[:49]
    by_class = {c: [it for it in items if it.label == c] for c in classes}
    spec = model_spec(config)
    torch.manual_seed(config.trainer.seed)
    module = EmbedderModule(spec, len(classes), config.model, config.loss, config.optim).eval()
    if args.run is not None:
        checkpoint = sorted((args.run / "checkpoints").glob("*.ckpt"))[-1]
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
        own = module.state_dict()  # the model, and the proxies when the run trained the same losses
        module.load_state_dict({k: v for k, v in state.items() if k in own and own[k].shape == v.shape}, strict=False)
    transform = eval_transform(spec.preprocessing)
    rng = random.Random(config.trainer.seed)
    p, k = config.data.classes_per_batch, config.data.images_per_class
    print(f"| batch | {config.loss.name}: loss / gradient norm | {config.loss.plus}: loss / gradient norm | ratio |")
    print("|---|---|---|---|")
    for batch in range(args.batches):
        chosen = rng.sample(range(len(classes)), p)
        picked = [(c, it) for c in chosen for it in rng.sample(by_class[classes[c]], k)]
        images = torch.stack([transform(load_image(it.path)) for _, it in picked])
        labels = torch.tensor([c for c, _ in picked])
        with torch.no_grad():
            embeddings = module.model.embed_features(module.pooled(images))
        embeddings.requires_grad_(True)
        first = module.criterion(embeddings, labels, module.miner(embeddings, labels) if module.miner else None)
        plus = module.plus_criterion(embeddings, labels)  # type: ignore[misc]
        g_first = torch.autograd.grad(first, embeddings)[0].norm().item()
        g_plus = torch.autograd.grad(plus, embeddings)[0].norm().item()
        ratio = g_plus / g_first
        print(f"| {batch} | {first.item():.3f} / {g_first:.4f} | {plus.item():.3f} / {g_plus:.4f} | {ratio:.1f} |")


if __name__ == "__main__":
    main()
