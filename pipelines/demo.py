"""A small, learnable image dataset written in the Kaggle ImageNet layout.

`make_demo(root)` draws 10 classes of shapes and textures (each with its own hue, jittered) at
random positions and scales on noisy backgrounds, and writes them exactly as Kaggle ships
ImageNet: `LOC_synset_mapping.txt`, an unsorted `LOC_val_solution.csv` with boxes, flat `val/`,
`train/<wnid>/<wnid>_<n>.JPEG`. So `--dataset=demo` runs the same code path as ImageNet.
Deterministic (fixed seed); built in a temp dir and renamed, so a half-made tree is never used.

The validation split (200 images per class, 2,000 in all) is larger than the training split: it
is the instrument for 1-point questions (int8 against float32), and at 250 images one image was
0.4 points. Version 1 had 25 per class; a
version-1 tree is rebuilt on first use (the training images are the same, drawn first from the
same seed).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys

import numpy as np

from keras_resnet.files import make_temp_dir, remove_stale_temps, rename_dir_if_absent
from pipelines.layout import KAGGLE_IMAGE_ROOT, SYNSET_MAPPING, VAL_SOLUTION, DataError

MARKER = ".keras_resnet_demo.json"
DEMO_VERSION = 2
TRAIN_SOLUTION = "LOC_train_solution.csv"
# (name, hue in [0, 1)): hues are spread so colour helps, shapes and textures do the rest.
CLASSES = [
    ("disc, circle", 0.00), ("square, box", 0.10), ("triangle", 0.20), ("ring, annulus", 0.30),
    ("cross, plus sign", 0.40), ("horizontal stripes", 0.50), ("vertical stripes", 0.60),
    ("checkerboard", 0.70), ("diagonal stripes", 0.80), ("polka dots", 0.90),
]
HUE_JITTER = 0.06
JPEG_QUALITY = 90


def make_demo(root: str, *, num_classes: int = 10, train_per_class: int = 120,
              val_per_class: int = 200, image_size: int = 64, seed: int = 0) -> str:
    """Creates the demo dataset at `root` unless it is already complete (an earlier version's
    tree is rebuilt); returns `root`."""
    root = os.path.abspath(root)
    marker = os.path.join(root, MARKER)
    old_version = _version(marker)
    if old_version is not None and old_version >= DEMO_VERSION:  # a newer one is used as it is
        return root
    if old_version is not None:
        print(f"{root} holds demo dataset version {old_version}; rebuilding it as version "
              f"{DEMO_VERSION} ({val_per_class} validation images per class, the same training "
              "images)", file=sys.stderr, flush=True)
    elif os.path.isdir(root) and os.listdir(root):
        raise DataError(f"{root} exists and is not a demo dataset (no {MARKER}): "
                        "pass an empty or new --data_dir for --dataset=demo")
    if not 1 <= num_classes <= len(CLASSES):
        raise ValueError(f"num_classes={num_classes}: must be in [1, {len(CLASSES)}]")
    parent = os.path.dirname(root)
    remove_stale_temps(parent)
    try:
        tmp = make_temp_dir(parent, os.path.basename(root))
    except OSError as error:
        if old_version is None:
            raise DataError(f"cannot create the demo dataset in {parent}: {error}; pass a "
                            "writable --data_dir") from error
        print(f"{root}: cannot rebuild it ({error}); using version {old_version} as it is",
              file=sys.stderr, flush=True)
        return root
    aside = None
    try:
        _write_tree(tmp, num_classes, train_per_class, val_per_class, image_size, seed)
        if old_version is not None:
            if _version(marker) == DEMO_VERSION:   # another process rebuilt it meanwhile
                return root
            # Aside, then replaced: a reader sees the old tree, none for an instant, or the new.
            aside = make_temp_dir(parent, os.path.basename(root) + "-old")
            with contextlib.suppress(FileNotFoundError):   # another process moved it first
                os.rename(root, aside)
        # Atomic: root is absent or complete. Another process may have won the race; its tree
        # is as good as ours.
        if not rename_dir_if_absent(tmp, root) and _version(marker) != DEMO_VERSION:
            raise DataError(f"{root} was filled by another process with something that is not "
                            "a demo dataset; pass an empty or new --data_dir")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if aside:
            shutil.rmtree(aside, ignore_errors=True)
    return root


def _version(marker: str) -> int | None:
    """The version in a demo tree's marker file: None without one, 0 when it is unreadable (then
    the tree is rebuilt)."""
    try:
        with open(marker) as f:
            return int(json.load(f).get("version", 0))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, AttributeError, TypeError):
        return 0


def _write_tree(out: str, num_classes, train_per_class, val_per_class, size, seed) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    wnids = [f"n{i + 1:08d}" for i in range(num_classes)]
    image_root = os.path.join(out, KAGGLE_IMAGE_ROOT)
    os.makedirs(os.path.join(image_root, "val"))
    train_rows, val_rows = [], []
    for label, wnid in enumerate(wnids):
        os.makedirs(os.path.join(image_root, "train", wnid))
        for n in range(train_per_class):
            pixels, box = draw_example(rng, label, size)
            image_id = f"{wnid}_{n}"
            Image.fromarray(pixels).save(os.path.join(image_root, "train", wnid, image_id + ".JPEG"),
                                         quality=JPEG_QUALITY)
            train_rows.append((image_id, f"{wnid} {' '.join(map(str, box))}"))
    val_labels = np.repeat(np.arange(num_classes), val_per_class)
    for n, label in enumerate(rng.permutation(val_labels)):
        pixels, box = draw_example(rng, int(label), size)
        image_id = f"ILSVRC2012_val_{n + 1:08d}"
        Image.fromarray(pixels).save(os.path.join(image_root, "val", image_id + ".JPEG"),
                                     quality=JPEG_QUALITY)
        boxes = [box] * (1 + n % 3)      # like Kaggle: some rows carry several boxes
        val_rows.append((image_id, " ".join(f"{wnids[label]} {' '.join(map(str, b))}"
                                            for b in boxes)))
    order = rng.permutation(len(val_rows))   # Kaggle's val rows are not sorted
    _write_csv(os.path.join(out, VAL_SOLUTION), [val_rows[i] for i in order])
    _write_csv(os.path.join(out, TRAIN_SOLUTION), train_rows)
    with open(os.path.join(out, SYNSET_MAPPING), "w") as f:
        f.writelines(f"{w} {CLASSES[i][0]}\n" for i, w in enumerate(wnids))
    with open(os.path.join(out, MARKER), "w") as f:
        json.dump({"version": DEMO_VERSION, "num_classes": num_classes, "seed": seed,
                   "train_per_class": train_per_class, "val_per_class": val_per_class,
                   "image_size": size}, f)


def _write_csv(path, rows):
    buf = io.StringIO()
    buf.write("ImageId,PredictionString\n")
    buf.writelines(f"{image_id},{pred}\n" for image_id, pred in rows)
    with open(path, "w") as f:
        f.write(buf.getvalue())


def draw_example(rng: np.random.Generator, label: int, size: int):
    """Returns (uint8 [size, size, 3] image of class `label`, box (xmin, ymin, xmax, ymax))."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    r = rng.uniform(0.22, 0.4) * size
    cx, cy = rng.uniform(r, size - r, 2)
    dx, dy = xx - cx, yy - cy
    d = np.hypot(dx, dy)
    inside = (np.abs(dx) < r) & (np.abs(dy) < r)
    period = r / rng.uniform(1.5, 2.5)
    name = CLASSES[label][0]
    mask = {
        "disc, circle": d < r,
        "square, box": (np.abs(dx) < 0.85 * r) & (np.abs(dy) < 0.85 * r),
        "triangle": (dy > -r) & (dy < 0.8 * r) & (np.abs(dx) < (dy + r) * 0.6),
        "ring, annulus": (d < r) & (d > 0.55 * r),
        "cross, plus sign": ((np.abs(dx) < 0.3 * r) | (np.abs(dy) < 0.3 * r)) & inside,
        "horizontal stripes": inside & (np.sin(2 * np.pi * dy / period) > 0),
        "vertical stripes": inside & (np.sin(2 * np.pi * dx / period) > 0),
        "checkerboard": inside & ((np.floor(dx / period * 2) + np.floor(dy / period * 2)) % 2 == 0),
        "diagonal stripes": inside & (np.sin(2 * np.pi * (dx + dy) / period) > 0),
        "polka dots": inside & (np.hypot((dx % period) - period / 2,
                                         (dy % period) - period / 2) < period / 4),
    }[name]
    background = rng.uniform(40, 200, 3) * 0.4 + rng.uniform(40, 200) * 0.6   # low saturation
    image = background + rng.normal(0, 14, (size, size, 3))
    hue = (CLASSES[label][1] + rng.uniform(-HUE_JITTER, HUE_JITTER)) % 1.0
    image[mask] = _hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0)) * 255
    image[mask] += rng.normal(0, 8, (int(mask.sum()), 3))
    ys, xs = np.nonzero(mask)
    box = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())) if len(xs) else (
        0, 0, size - 1, size - 1)
    return np.clip(image, 0, 255).astype(np.uint8), box


def _hsv_to_rgb(h, s, v) -> np.ndarray:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i])
