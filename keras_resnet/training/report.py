"""What a finished run leaves for people: history.csv read back, curves.png, results.json."""

import csv
import os

from keras_resnet.files import atomic_path

HISTORY_CSV = "history.csv"
CURVES_PNG = "curves.png"
RESULTS_JSON = "results.json"


def read_history(path):
    """history.csv (appended across restarts) -> {column: [values]}, last row per epoch wins."""
    if not os.path.exists(path):
        return {}
    rows = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            if row.get("epoch", "").strip().isdigit():
                rows[int(row["epoch"])] = row
    columns = {}
    for epoch in sorted(rows):
        for key, value in rows[epoch].items():
            try:
                columns.setdefault(key, []).append(float(value))
            except (TypeError, ValueError):
                pass
    return columns


def plot_curves(history, path):
    """Loss and top-1 per epoch, train and validation, as a PNG."""
    if not history.get("epoch"):
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [e + 1 for e in history["epoch"]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, title in ((axes[0], "loss", "loss"), (axes[1], "top1", "top-1 accuracy")):
        for prefix, label in (("", "train"), ("val_", "validation")):
            values = history.get(prefix + metric)
            if values:
                ax.plot(epochs[:len(values)], values, marker="o", label=label)
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
