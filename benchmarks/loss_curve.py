"""The default model's training curve: benchmarks/results/default_model_loss.csv and .png (train_default_model.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def write_loss(rows: list, csv_path: Path, png_path: Path) -> None:
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w") as f:
        f.write("step,tokens,seconds,lr,train_loss,val_loss\n")
        for r in rows:
            f.write(",".join("" if r[k] is None else str(r[k])
                             for k in ("step", "tokens", "seconds", "lr", "train_loss", "val_loss")) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = [(r["tokens"], r["train_loss"]) for r in rows if r["train_loss"] is not None]
    va = [(r["tokens"], r["val_loss"]) for r in rows if r["val_loss"] is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([t for t, _ in tr], [l for _, l in tr], lw=0.6, alpha=0.5, label="train (batch)")
    if len(tr) > 20:
        k = 20
        sm = np.convolve([l for _, l in tr], np.ones(k) / k, mode="valid")
        ax.plot([t for t, _ in tr][k - 1:], sm, lw=1.5, label=f"train ({k}-step mean)")
    if va:
        ax.plot([t for t, _ in va], [l for _, l in va], "o-", ms=3, label="validation (held-out stdlib files)")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title("edgephi default model: Phi-3 arch, stdlib Python, CPU")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
