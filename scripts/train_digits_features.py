"""Train the digits feature network shipped as ddpmctl/assets/digits_features.safetensors, and report its accuracy.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/train_digits_features.py [--out PATH] [--epochs 60] [--seed 0]

A small classifier (ddpmctl.features.DigitsClassifier, about 56k parameters) trained on builtin:digits' train split
(1,437 images) with random shifts of up to one pixel, Adam, cross-entropy; the held-out test split (360 images) is
used only to report the accuracy, which is written into the file's metadata. Deterministic for a seed on one
machine; about a minute on one CPU core.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from ddpmctl import __version__
from ddpmctl.checkpoint import save_tensors
from ddpmctl.data import load_dataset
from ddpmctl.features import DIGITS_WEIGHTS, DigitsClassifier

ASSET = Path(__file__).resolve().parent.parent / "ddpmctl" / "assets" / DIGITS_WEIGHTS


def _shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image moved by -1, 0 or +1 pixels in each direction (the background, -1, fills the gap)."""
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dy, dx = torch.randint(0, 3, (2, x.shape[0]), generator=generator)
    return torch.stack([padded[i, :, dy[i]:dy[i] + 8, dx[i]:dx[i] + 8] for i in range(x.shape[0])])


def _accuracy(model: DigitsClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean())


def train(epochs: int, seed: int, batch_size: int = 64, lr: float = 2e-3) -> tuple[DigitsClassifier, dict[str, float]]:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train_set = load_dataset("builtin:digits", split="train", class_cond=True)
    test_set = load_dataset("builtin:digits", split="test", class_cond=True)
    x = train_set.images.float() / 127.5 - 1
    y = train_set.labels
    model = DigitsClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * -(-len(x) // batch_size))
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            pick = order[start:start + batch_size]
            loss = F.cross_entropy(model(_shift(x[pick], generator)), y[pick])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    test_x = test_set.images.float() / 127.5 - 1
    scores = {"train_accuracy": _accuracy(model, x, y), "test_accuracy": _accuracy(model, test_x, test_set.labels)}
    return model, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ASSET)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, scores = train(args.epochs, args.seed)
    metadata = {"network": "ddpmctl.features.DigitsClassifier", "trained_on": "builtin:digits, train split (1,437)",
                "script": "scripts/train_digits_features.py", "epochs": str(args.epochs), "seed": str(args.seed),
                "created_with": __version__, **{k: f"{v:.4f}" for k, v in scores.items()}}
    save_tensors(args.out, model.state_dict(), metadata, what="digits feature network")
    print(json.dumps({"out": str(args.out), **scores}, indent=2))


if __name__ == "__main__":
    main()
