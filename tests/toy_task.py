"""A tiny regression task for exercising the shared training loop."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset


class _Points(Dataset):
    def __init__(self, n: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.x = rng.normal(size=(n, 4)).astype(np.float32)
        self.y = (self.x @ np.array([1.0, -2.0, 0.5, 0.0], dtype=np.float32))[:, None]

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        noise = np.float32(np.random.normal(scale=0.01))  # exercises the RNG seeding on resume
        return {"x": torch.from_numpy(self.x[i] + noise), "y": torch.from_numpy(self.y[i])}


class ToyTask:
    stage = "toy"
    metric = "neg_mse"
    metric_mode = "max"

    def __init__(self, n_train: int = 24, n_val: int = 10) -> None:
        self.n_train, self.n_val = n_train, n_val
        self.best_calls = 0

    def build_model(self, pretrained_source: bool = True) -> nn.Module:
        return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))

    def datasets(self):
        return _Points(self.n_train, 0), _Points(self.n_val, 1)

    def loss(self, model, batch, device):
        return nn.functional.mse_loss(model(batch["x"].to(device)), batch["y"].to(device))

    def predict_batch(self, model, batch, device):
        return {"pred": model(batch["x"].to(device)).float().cpu().numpy(), "y": batch["y"].numpy()}

    def compute_metrics(self, outputs):
        return {"neg_mse": -float(np.mean((outputs["pred"] - outputs["y"]) ** 2)), "n": float(len(outputs["y"]))}

    def on_best(self, outputs, out_dir: Path) -> None:
        self.best_calls += 1
        (out_dir / "best_outputs.npy").parent.mkdir(parents=True, exist_ok=True)
        np.save(out_dir / "best_outputs.npy", outputs["pred"])
