"""Builds tiny ImageNet trees in the Kaggle layout (and zips of them) for tests.

`make_kaggle_tree(root)` writes LOC_synset_mapping.txt, an unsorted LOC_val_solution.csv whose rows
carry several boxes, LOC_train_solution.csv, LOC_sample_submission.csv, train/<wnid>/*.JPEG, flat
val/ and test/. With `broken=True` the train split also holds the files that break naive
pipelines: a CMYK JPEG and a PNG named .JPEG (both readable, must be kept) and a truncated JPEG,
an empty file and a text file named .JPEG (must be skipped).
"""

from __future__ import annotations

import io
import os
import tarfile
import zipfile

import numpy as np
from PIL import Image

IMAGE_ROOT = os.path.join("ILSVRC", "Data", "CLS-LOC")
NESTED_TAR = "imagenet_object_localization_patched2019.tar.gz"
# Reasons (substrings) that pipelines.sources reports for each broken kind.
BROKEN_REASONS = {"truncated": "truncated JPEG", "empty": "empty file", "text": "not an image"}


def image_bytes(rng, size, fmt="JPEG", mode="RGB") -> bytes:
    """A random-ish image (a colour gradient plus noise) encoded as `fmt` in `mode`."""
    base = rng.integers(0, 256, 3)
    grad = np.linspace(0, 80, size, dtype=np.float32)[None, :, None]
    pixels = np.clip(base + grad + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def make_kaggle_tree(root, num_classes=3, train_per_class=4, val_per_class=2, image_size=48,
                     broken=True, test_images=2, seed=0) -> dict:
    """Writes the tree under `root`; returns what it wrote.

    Returns a dict with: root, image_root, class_ids (sorted wnids), class_names,
    train / val: {absolute path: label} of the files a reader must keep (CMYK and PNG included),
    broken: {absolute path: reason substring} of the files a reader must skip,
    cmyk / png: the paths of those two files (or None), counts: {"train", "val", "test"} of all
    image files on disk including broken ones.
    """
    rng = np.random.default_rng(seed)
    root = os.path.abspath(str(root))
    image_root = os.path.join(root, IMAGE_ROOT)
    class_ids = [f"n{1440764 + 1000 * i:08d}" for i in range(num_classes)]
    class_names = [f"class {i}, thing {i}" for i in range(num_classes)]
    train, val, broken_files = {}, {}, {}
    train_rows = []
    for label, wnid in enumerate(class_ids):
        class_dir = os.path.join(image_root, "train", wnid)
        os.makedirs(class_dir)
        for n in range(train_per_class):
            path = os.path.join(class_dir, f"{wnid}_{n}.JPEG")
            _write(path, image_bytes(rng, image_size))
            train[path] = label
            train_rows.append(f"{wnid}_{n},{wnid} 1 2 30 40")
    cmyk = png = None
    if broken:
        wnid0, wnid1 = class_ids[0], class_ids[-1]
        cmyk = os.path.join(image_root, "train", wnid0, f"{wnid0}_9001.JPEG")
        _write(cmyk, image_bytes(rng, image_size, mode="CMYK"))
        train[cmyk] = 0
        png = os.path.join(image_root, "train", wnid1, f"{wnid1}_9002.JPEG")
        _write(png, image_bytes(rng, image_size, fmt="PNG"))
        train[png] = num_classes - 1
        truncated = os.path.join(image_root, "train", wnid0, f"{wnid0}_9003.JPEG")
        _write(truncated, image_bytes(rng, image_size)[:300])
        empty = os.path.join(image_root, "train", wnid1, f"{wnid1}_9004.JPEG")
        _write(empty, b"")
        text = os.path.join(image_root, "train", wnid0, f"{wnid0}_9005.JPEG")
        _write(text, b"<html>403 Forbidden</html>\n")
        broken_files = {truncated: BROKEN_REASONS["truncated"], empty: BROKEN_REASONS["empty"],
                        text: BROKEN_REASONS["text"]}

    os.makedirs(os.path.join(image_root, "val"))
    val_rows = []
    labels = rng.permutation(np.repeat(np.arange(num_classes), val_per_class))
    for n, label in enumerate(labels):
        image_id = f"ILSVRC2012_val_{n + 1:08d}"
        path = os.path.join(image_root, "val", image_id + ".JPEG")
        _write(path, image_bytes(rng, image_size))
        val[path] = int(label)
        # Several boxes per row; the label is the first wnid (later boxes may name other wnids
        # in real data too, so make the second box's wnid differ when possible).
        other = class_ids[(label + 1) % num_classes]
        val_rows.append(f"{image_id},{class_ids[label]} 10 12 40 44 {other} 1 1 5 5 ")
    val_rows = [val_rows[i] for i in rng.permutation(len(val_rows))]
    if len(val_rows) > 1 and val_rows == sorted(val_rows):
        val_rows.reverse()    # the point is that rows are not sorted

    os.makedirs(os.path.join(image_root, "test"))
    for n in range(test_images):
        _write(os.path.join(image_root, "test", f"ILSVRC2012_test_{n + 1:08d}.JPEG"),
               image_bytes(rng, image_size))

    _write(os.path.join(root, "LOC_synset_mapping.txt"),
           "".join(f"{w} {name}\n" for w, name in zip(class_ids, class_names, strict=True)).encode())
    _write(os.path.join(root, "LOC_val_solution.csv"),
           ("ImageId,PredictionString\n" + "\n".join(val_rows) + "\n").encode())
    _write(os.path.join(root, "LOC_train_solution.csv"),
           ("ImageId,PredictionString\n" + "\n".join(train_rows) + "\n").encode())
    _write(os.path.join(root, "LOC_sample_submission.csv"),
           b"ImageId,PredictionString\nILSVRC2012_test_00000001,n01440764 1 1 2 2\n")
    counts = {"train": len(train) + len(broken_files), "val": len(val), "test": test_images}
    return {"root": root, "image_root": image_root, "class_ids": class_ids,
            "class_names": class_names, "train": train, "val": val, "broken": broken_files,
            "cmyk": cmyk, "png": png, "counts": counts}


def make_kaggle_zip(tree_root, zip_path, nested=False) -> str:
    """Zips a tree made by make_kaggle_tree in either shape Kaggle users see.

    nested=False: LOC_* files and ILSVRC/ directly in the zip. nested=True: LOC_* files plus
    ILSVRC/ inside imagenet_object_localization_patched2019.tar.gz inside the zip.
    """
    tree_root = str(tree_root)
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_STORED) as zf:
        for name in sorted(os.listdir(tree_root)):
            if name.startswith("LOC_"):
                zf.write(os.path.join(tree_root, name), name)
        if nested:
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w:gz") as tf:
                tf.add(os.path.join(tree_root, "ILSVRC"), "ILSVRC")
            zf.writestr(NESTED_TAR, buf.getvalue())
        else:
            for dirpath, _, files in sorted(os.walk(os.path.join(tree_root, "ILSVRC"))):
                for f in sorted(files):
                    path = os.path.join(dirpath, f)
                    zf.write(path, os.path.relpath(path, tree_root))
    return str(zip_path)


def _write(path, data) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
