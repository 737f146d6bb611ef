"""Loss curves as PNG (written atomically)."""

from __future__ import annotations

import json
from pathlib import Path

from ..io import save_figure


def plot_loss(metrics_file: str | Path, png: str | Path, title: str = "lorq finetune") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = {}, {}
    for line in Path(metrics_file).read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            train[r["step"]] = r["loss"]
        if "val_loss" in r:
            val[r["step"]] = r["val_loss"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(list(train), list(train.values()), label="train loss", lw=1)
    if val:
        ax.plot(list(val), list(val.values()), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, png, dpi=110)
