"""Where the images are: Kaggle ImageNet, ImageFolder, TFDS, demo, synthetic -> `Source`.

`load_source(dataset, data_dir)` returns file lists and 0-based labels; decoding happens later in
`pipelines.dataset`. Layouts read where they lie (no files are moved):

* Kaggle, as extracted: `LOC_synset_mapping.txt` (class i = line i = i-th sorted wnid),
  `ILSVRC/Data/CLS-LOC/train/<wnid>/*.JPEG`, flat `val/` labelled by `LOC_val_solution.csv`.
* ImageFolder: `train/<class>/*`, `val/<class>/*` (what valprep.sh produces); as in torchvision,
  files in sub-folders of a class folder belong to that class.
* Shards: what `python -m pipelines.prepare` wrote (a TFDS dataset of TFRecord shards), on a local
  disk or any `tf.io.gfile` filesystem (gs://); splits carry `Shards` instead of file lists.

Listing and screening 1.28M files is slow, so the index (file lists, labels, skipped files) is
cached in `DIR/.keras_resnet_index.npz`, or under `cache_dir` / `~/.cache/keras_resnet` when DIR
is read-only. The cache key is the mtime of every split and class directory plus the size and
mtime of the label files (and of the sub-folders inside class folders, checked on loading):
adding, removing or renaming a file changes its directory's mtime.
Rewriting a file in place does not; delete the cache file to force a rescan after doing that.
"""

from __future__ import annotations

import codecs
import collections
import concurrent.futures
import csv
import dataclasses
import hashlib
import io
import json
import os
import sys
import unicodedata
from collections.abc import Callable, Iterable

import numpy as np

from keras_resnet.files import atomic_path, write_bytes_atomic
from pipelines import formats
from pipelines.layout import (  # noqa: F401  (DataError and the names are part of this API)
    EXTRACTING_MARKER,
    KAGGLE_IMAGE_ROOT,
    SYNSET_MAPPING,
    VAL_SOLUTION,
    DataError,
)

INDEX_FILE = ".keras_resnet_index.npz"
# 2: screening searches a 4 KiB tail; 3: classes without training images; 4: mapping and CSV
# read with a byte-order mark, tab-separated mapping, CSV ImageIds with a file extension, class
# folders read with their sub-folders; 5: valid/ or validation/ as the validation folder, names
# that are not UTF-8 skipped; 6: links to nothing loose in a split folder reported; 7: CSV labels
# that are class ids with spaces, ImageIds with any extension, NFC/NFD names, names with line
# breaks skipped, end markers found past the 4 KiB tail, an empty val/ beside a CSV reported;
# 8: WebP images with an alpha channel decode (an index built with --check_images=decode
# had left them out); an ImageId on several CSV rows takes its first row's label (was the last);
# animated WebP files are left out at the header check (they became stand-ins in training)
INDEX_VERSION = 8
# Folder names of the validation split, in order of preference (Kaggle: val/; many datasets
# published in the ImageFolder layout: valid/ or validation/).
VAL_DIRS = ("val", "valid", "validation")
IMAGE_EXTENSIONS = frozenset({".jpeg", ".jpg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"})
DEFAULT_CACHE_DIR = os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
    "keras_resnet",
    "index",
)
SKIPPED_REPORT = "skipped_files.tsv"
SYNTHETIC_NUM_CLASSES = 1000
SCREEN_THREADS = 32          # screening is I/O bound (two small reads a file): threads overlap waits
SCREEN_BATCH = 2048          # files per thread-pool task, to keep per-future overhead small
PROGRESS_MIN_FILES = 20_000  # a header check of fewer files takes a moment: no progress bar
TAIL_BYTES = 4096  # JPEGs may carry padding or trailers after the end-of-image marker

UNSUPPORTED_MAGIC = {b"II*\x00": "TIFF", b"MM\x00*": "TIFF", b"RIFF": "RIFF (not WebP)",
                     b"\x00\x00\x00\x0cjP": "JPEG 2000"}

FIX_HINT = ("point --data_dir at the folder holding train/ (and val/) with one sub-folder per "
            "class, or at the Kaggle ImageNet root; to get ImageNet, run `python -m "
            "keras_resnet.download --data_dir=DIR`; to try the project, `--dataset=demo`")


@dataclasses.dataclass(frozen=True)
class Shards:
    """Record shards of one split: paths in shard order, records per shard, and how to read one
    serialized record as (encoded image bytes, int64 label)."""

    paths: tuple[str, ...]
    lengths: tuple[int, ...]
    parse: Callable[[object], tuple[object, object]]


@dataclasses.dataclass(frozen=True)
class Split:
    """One split. File-based sources set `files`; TFDS sets `records` and leaves `files` None;
    prepared shards set `records` (every record once, in shard order) and `shards`."""

    files: np.ndarray | None        # absolute str paths (dtype object), sorted
    labels: np.ndarray | None       # int64, 0-based, one per file
    records: Callable[[], object] | None = None   # () -> tf.data.Dataset of (bytes, int64 label)
    num_examples: int | None = None  # len(files) when not given
    shards: Shards | None = None     # prepared shards: lets training read shard by shard

    def __post_init__(self):
        if self.num_examples is None:
            if self.files is None:
                raise ValueError("Split needs files or num_examples")
            object.__setattr__(self, "num_examples", len(self.files))
        if self.files is not None and len(self.files) != len(self.labels):
            raise ValueError(f"Split has {len(self.files)} files but {len(self.labels)} labels")


@dataclasses.dataclass(frozen=True)
class Source:
    """Classes and splits of one dataset; see the module docstring for the layouts."""

    name: str
    class_ids: list[str]
    class_names: list[str]
    train: Split | None
    val: Split | None
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    layout: str = ""                # "kaggle", "imagefolder", "tfds", "shards", "synthetic"
    root: str = ""                  # directory the paths live under ("" for TFDS/synthetic)

    @property
    def num_classes(self) -> int:
        return len(self.class_ids)

    def skipped_in(self, split: str) -> list[tuple[str, str]]:
        """The entries of `skipped` under the folder of `split` ("train" or "val")."""
        if not self.root:
            return []
        folder = os.path.join(self.root, split_dir_name(self.root, split))
        return [(p, r) for p, r in self.skipped if p == folder or p.startswith(folder + os.sep)]

    def summary(self) -> str:
        """One line for the start-up log: classes and counts per split."""
        parts = [f"{self.name} ({self.layout}{' at ' + self.root if self.root else ''}): "
                 f"{self.num_classes} classes"]
        for split_name, split in (("train", self.train), ("val", self.val)):
            if split is not None:
                parts.append(f"{split_name} {split.num_examples:,}")
        if self.skipped:
            parts.append(f"left out {len(self.skipped):,} files or folders (see {SKIPPED_REPORT})")
        return ", ".join(parts)


def load_source(dataset: str, data_dir: str, *, cache_dir: str | None = None,
                screen: str = "header", write_index: bool = True) -> Source:
    """Returns the `Source` for `dataset`: "imagenet", "demo", "shards", "tfds:NAME",
    "synthetic[:N]".

    "shards" reads what `python -m pipelines.prepare --out=DIR` wrote; `data_dir` is that DIR.

    "imagenet" detects the Kaggle or ImageFolder layout under `data_dir`. "demo" writes a small
    dataset in the Kaggle layout on first use. "synthetic" has class ids but no splits
    (train = val = None): `pipelines.dataset.synthetic_dataset` makes the tensors.
    `screen` is the per-file check made when building the index: "header" (first and last bytes:
    empty, truncated and non-image files), "decode" (also decodes every file as training would,
    with a progress bar: finds the rare corrupt file that passes the header check) or "none".
    `write_index=False` (the non-chief workers of a multi-worker run) reads a cached index but
    never writes one.
    """
    if dataset == "imagenet":
        return _load_folder_source("imagenet", _require_dir(data_dir), cache_dir, screen,
                                   write_index)
    if dataset == "demo":
        from pipelines import demo  # local: only the demo needs PIL
        root = demo.make_demo(os.path.expanduser(data_dir))
        return _load_folder_source("demo", root, cache_dir, screen, write_index)
    if dataset == "shards":
        return _load_shards(data_dir)
    if dataset.startswith("tfds:") and len(dataset) > 5:
        return _load_tfds(dataset[5:], data_dir)
    if dataset == "synthetic" or dataset.startswith("synthetic:"):
        return _synthetic_source(dataset)
    raise DataError(f"unknown dataset {dataset!r}: use imagenet, demo, shards, tfds:NAME (e.g. "
                    "tfds:imagenet2012) or synthetic")


def write_skipped_report(source: Source, model_dir: str) -> str:
    """Writes `<model_dir>/skipped_files.tsv` (path, reason per line) and returns its path.

    Written (atomically) even when nothing was skipped, so its presence says the check ran.
    """
    os.makedirs(model_dir, exist_ok=True)
    path = os.path.join(model_dir, SKIPPED_REPORT)
    lines = ["path\treason\n"] + [f"{p}\t{reason}\n" for p, reason in source.skipped]
    write_bytes_atomic(path, "".join(lines).encode("utf-8"))
    return path


# ---------------------------------------------------------------------------------------------
# Layout detection


def _require_dir(data_dir: str) -> str:
    if not data_dir:
        raise DataError(f"--data_dir is empty: {FIX_HINT}")
    root = os.path.abspath(os.path.expanduser(data_dir))
    if not os.path.isdir(root):
        raise DataError(f"data_dir {root} does not exist: {FIX_HINT}")
    return root


def _check_extraction_finished(directory: str) -> None:
    if os.path.exists(os.path.join(directory, EXTRACTING_MARKER)):
        raise DataError(f"the extraction into {directory} did not finish: run `python -m "
                        f"keras_resnet.download --data_dir={directory}` again to complete it")


def split_dir_name(image_root: str, split: str) -> str:
    """The folder of `split` ("train" or "val") under `image_root`: for "val", the first of
    VAL_DIRS that exists (val/ when none does)."""
    if split == "train":
        return "train"
    return next((d for d in VAL_DIRS if os.path.isdir(os.path.join(image_root, d))), "val")


def _find_layout(root: str) -> tuple[str, str | None, str]:
    """Returns (image_root holding train/ and val/, directory of LOC_* files or None, layout)."""
    # data_dir may be the Kaggle root, any folder on the way to ILSVRC/Data/CLS-LOC (that one
    # included), or an ImageFolder root.
    parts = KAGGLE_IMAGE_ROOT.split(os.sep)
    candidates = [os.path.join(root, *parts[i:]) for i in range(len(parts))] + [root]
    for image_root in candidates:
        if any(os.path.isdir(os.path.join(image_root, d)) for d in ("train", *VAL_DIRS)):
            break
    else:
        raise DataError(f"no train/ or val/ folder in {root} nor in "
                        f"{os.path.join(root, KAGGLE_IMAGE_ROOT)}: {FIX_HINT}")
    meta_dirs = [root, image_root]
    if os.path.normpath(image_root).endswith(os.sep + KAGGLE_IMAGE_ROOT):
        # The Kaggle root, three levels up, only for the Kaggle tree: an ImageFolder that merely
        # lies three levels below some folder with LOC_* files is not labelled by them.
        meta_dirs.append(os.path.dirname(os.path.dirname(os.path.dirname(image_root))))
    for meta_dir in meta_dirs:
        if os.path.isfile(os.path.join(meta_dir, SYNSET_MAPPING)) or os.path.isfile(
                os.path.join(meta_dir, VAL_SOLUTION)):
            return image_root, meta_dir, "kaggle"
    return image_root, None, "imagefolder"


def _read_text(path: str) -> str:
    """The text of a label file, with \n line ends: UTF-8 (a byte-order mark, as files saved on
    Windows start, is not part of the first line), or UTF-16 or UTF-32 with a byte-order mark
    (Excel's and Notepad's "Unicode text"); any other encoding is refused in one line that says
    how to convert it."""
    with open(path, "rb") as f:
        data = f.read()
    # UTF-32's marks first: UTF-32-LE's starts with UTF-16-LE's.
    encoding = next((name for name, marks in (
        ("utf-32", (codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)),
        ("utf-16", (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))) if data.startswith(marks)),
        "utf-8-sig")
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not {encoding.replace('-sig', '').upper()} text (byte "
                        f"0x{data[e.start]:02x} at offset {e.start}): save it as UTF-8, e.g. "
                        f"iconv -f latin1 -t utf-8 OLD > {os.path.basename(path)}") from None
    # Lines end at \n, \r\n or \r only (str.splitlines also breaks at \f, U+2028, ...).
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _read_synset_mapping(path: str) -> tuple[list[str], list[str]]:
    """Returns (wnids, names) sorted by wnid; the Kaggle file is already sorted (line i = class i)."""
    pairs = []
    lines = [line.strip() for line in _read_text(path).split("\n") if line.strip()]
    # "id names": tab-separated when most lines with a separator have a tab (then an id may
    # hold spaces), else space-separated (then a name may hold a tab); decided for the whole
    # file, so one odd line reads as its neighbours do.
    several = [line for line in lines if len(line.split()) > 1]
    tabs = 2 * sum("\t" in line for line in several) > len(several)
    for line in lines:
        fields = ([x.strip() for x in line.split("\t", 1)] if tabs
                  else line.split(maxsplit=1))
        pairs.append((fields[0], fields[1].strip() if len(fields) > 1 else fields[0]))
    if not pairs:
        raise DataError(f"{path} is empty: it lists the classes, one 'id name' per line (for "
                        "ImageNet, re-extract it with `python -m keras_resnet.download "
                        "--data_dir=DIR`)")
    twice = sorted(w for w, n in collections.Counter(w for w, _ in pairs).items() if n > 1)
    if twice:
        raise DataError(f"{path} lists the class id {twice[0]!r} twice"
                        f"{f' (and {len(twice) - 1} more)' if len(twice) > 1 else ''}: "
                        "each class once, one per line")
    pairs.sort()
    return [w for w, _ in pairs], [n for _, n in pairs]


def _read_val_solution(path: str, class_ids=()) -> dict[str, str]:
    """ImageId -> class id of the first box. Rows are not sorted and may carry several boxes. An
    ImageId may also be written as a file name (`ILSVRC2012_val_00000001.JPEG`). A class id may
    hold spaces (a tab-separated mapping): the longest of `class_ids` that starts the
    PredictionString is taken, else its first word. An ImageId on several rows (a CSV written
    one row per box) takes the label of its first row that has one, as a row takes its first
    box's."""
    spaced = sorted((c for c in class_ids if " " in c), key=len, reverse=True)
    labels = {}
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
    header = next(reader, None)
    if header is None or [h.strip() for h in header[:2]] != ["ImageId", "PredictionString"]:
        raise DataError(f"{path}: expected the header line 'ImageId,PredictionString' (comma-"
                        f"separated), got {header}: add it or fix the separator")
    for row in reader:
        if not row or not row[0].strip():
            continue
        prediction = row[1].strip() if len(row) >= 2 else ""
        # The longest id that starts it: boxes are numbers, so "a b 1 2 3 4" is class "a b" when
        # there is one, even beside a class "a". "" for a row without a label.
        image_id = _image_id(row[0].strip())
        if labels.get(image_id):
            continue   # a later row of an image already labelled (one row per box)
        labels[image_id] = next(
            (c for c in spaced if prediction == c or prediction.startswith(c + " ")),
            prediction.split(maxsplit=1)[0] if prediction else "")
    return labels


def _image_id(name: str) -> str:
    """`name` without an image file extension (the Kaggle CSV's ImageIds have none)."""
    stem, ext = os.path.splitext(name)
    return stem if ext.lower() in IMAGE_EXTENSIONS else name


def _scan(directory: str, skipped: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """(files, folders): the visible names in `directory` (hidden ones are temp or metadata),
    in one listing (ImageNet's class folders hold 1.28M files). Names that are not UTF-8 or hold
    a line break or tab, and links to nothing, go to `skipped` with the reason."""
    files, folders = [], []
    with os.scandir(directory) as it:
        for entry in it:
            if entry.name.startswith("."):
                continue
            if not _is_utf8(entry.name):
                skipped.append((printable(entry.path), "name is not UTF-8: rename it"))
            elif not _usable_name(entry.name):
                # The index and skipped_files.tsv are lines of tab-separated fields.
                skipped.append((entry.path.translate(_LINE_BREAKS),
                                "name holds a line break or tab: rename it"))
            elif entry.is_file():
                files.append(entry.name)
            elif entry.is_dir():
                folders.append(entry.name)
            elif entry.is_symlink():
                skipped.append((entry.path, "link to a file that does not exist"))
    return files, sorted(folders)


_LINE_BREAKS = str.maketrans({"\n": "\\n", "\r": "\\r", "\t": "\\t"})


def _usable_name(name: str) -> bool:
    """UTF-8 and without a line break or tab (the index and skipped_files.tsv are lines of
    tab-separated fields)."""
    return _is_utf8(name) and not any(c in name for c in "\n\r\t")


def _is_utf8(name: str) -> bool:
    """False for a name holding bytes that are not UTF-8 (Python keeps them as surrogates):
    TensorFlow cannot take it as a string tensor."""
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def printable(path: str) -> str:
    """`path` with bytes that are not UTF-8 shown as U+FFFD, for reports and the index."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _list_class_folder(directory: str, nested: dict[str, int], image_root: str,
                       skipped: list[tuple[str, str]]) -> list[str]:
    """Names of the visible files under a class folder, relative to it. Like torchvision's
    ImageFolder, sub-folders are read too (their paths and mtimes go into `nested`, relative to
    `image_root`, so the cached index notices files added down there). Links to nothing and
    names that are not UTF-8 go to `skipped` with the reason."""
    names, subs = _scan(directory, skipped)
    here = os.path.realpath(directory) + os.sep
    for sub in subs:
        path = os.path.join(directory, sub)
        if here.startswith(os.path.realpath(path) + os.sep):
            continue  # a link back up the tree
        nested[os.path.relpath(path, image_root)] = os.stat(path).st_mtime_ns
        names += [os.path.join(sub, n)
                  for n in _list_class_folder(path, nested, image_root, skipped)]
    return names


def _list_dirs(directory: str) -> list[str]:
    with os.scandir(directory) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


# ---------------------------------------------------------------------------------------------
# Index: build, screen, cache


def _tree_key(image_root: str, meta_dir: str | None) -> str:
    """Cheap fingerprint of the tree: directory mtimes and label-file stats (see module doc)."""
    parts = [f"v{INDEX_VERSION}", image_root]
    for split in ("train", "val"):
        split_dir = os.path.join(image_root, split_dir_name(image_root, split))
        if not os.path.isdir(split_dir):
            parts.append(f"{split}:absent")
            continue
        parts.append(f"{split_dir}:{os.stat(split_dir).st_mtime_ns}")
        for sub in _list_dirs(split_dir):
            parts.append(f"{split}/{sub}:{os.stat(os.path.join(split_dir, sub)).st_mtime_ns}")
    if meta_dir:
        for name in (SYNSET_MAPPING, VAL_SOLUTION):
            path = os.path.join(meta_dir, name)
            if os.path.isfile(path):
                st = os.stat(path)
                parts.append(f"{name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode("utf-8", "surrogateescape")).hexdigest()


def _build_index(image_root: str, meta_dir: str | None, screen: str) -> dict:
    """Lists the tree. Returns class ids/names, relative paths and labels per split, skipped."""
    class_ids = class_names = None
    if meta_dir and os.path.isfile(os.path.join(meta_dir, SYNSET_MAPPING)):
        class_ids, class_names = _read_synset_mapping(os.path.join(meta_dir, SYNSET_MAPPING))
    train_dir = os.path.join(image_root, "train")
    # Names _scan reports (not UTF-8, a line break or tab) are not classes.
    train_classes = ([c for c in _list_dirs(train_dir) if _usable_name(c)]
                     if os.path.isdir(train_dir) else [])
    if class_ids is None:
        if not train_classes:
            raise DataError(f"{train_dir} has no class folders and there is no {SYNSET_MAPPING}: "
                            f"{FIX_HINT}")
        class_ids = class_names = train_classes
    class_index = {c: i for i, c in enumerate(class_ids)}
    # A name also matches in the other Unicode normal form: macOS writes folder names decomposed
    # (NFD), most editors save text composed (NFC); the two look the same.
    for c, i in list(class_index.items()):
        for form in ("NFC", "NFD"):
            class_index.setdefault(unicodedata.normalize(form, c), i)
    unknown = sorted(set(train_classes) - set(class_index))
    if unknown:
        spaces = any(" " in c for c in unknown)
        raise DataError(f"{train_dir} has class folders not in {SYNSET_MAPPING}: "
                        f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}; "
                        "remove them or fix the mapping"
                        + (" (a class id with spaces needs a tab after it, then its name: "
                           "'id<TAB>name')" if spaces else ""))

    skipped: list[tuple[str, str]] = []
    splits = {}
    nested: dict[str, int] = {}   # sub-folders of class folders -> mtime (see _load_index)
    for split in ("train", "val"):
        dir_name = split_dir_name(image_root, split)
        split_dir = os.path.join(image_root, dir_name)
        if not os.path.isdir(split_dir):
            continue
        pairs = []   # (relative path, label)
        loose, subdirs = _scan(split_dir, skipped)
        for sub in subdirs:
            if sub not in class_index:
                skipped.append((os.path.join(split_dir, sub),
                                f"folder not a class in {dir_name}/"))
                continue
            pairs += [(os.path.join(dir_name, sub, n), class_index[sub])
                      for n in _list_class_folder(os.path.join(split_dir, sub), nested,
                                                  image_root, skipped)]
        has_solution = bool(meta_dir) and os.path.isfile(os.path.join(meta_dir, VAL_SOLUTION))
        # A flat val/ needs the CSV; next to class folders, loose files are strays (or half-run
        # valprep, which the CSV still labels).
        if loose and split == "val" and (has_solution or not subdirs):
            pairs += _label_flat_val(split_dir, loose, meta_dir, class_index, skipped,
                                     has_folders=bool(subdirs))
        elif split == "val" and has_solution and not subdirs:
            skipped.append((split_dir, f"empty, though {VAL_SOLUTION} lists images: extract "
                                       "them again"))
        elif loose:
            skipped += [(os.path.join(split_dir, n), "file outside class folders") for n in loose]
        pairs.sort()
        splits[split] = pairs

    if screen != "none":
        for split, pairs in splits.items():
            reasons = _screen([os.path.join(image_root, p) for p, _ in pairs], split,
                              decode=screen == "decode")
            skipped += [(os.path.join(image_root, p), r)
                        for (p, _), r in zip(pairs, reasons, strict=True) if r]
            splits[split] = [pair for pair, r in zip(pairs, reasons, strict=True) if not r]
    if not any(splits.values()):
        raise DataError(f"no images under {image_root}/train or "
                        f"{image_root}/{split_dir_name(image_root, 'val')}: {FIX_HINT}")
    if splits.get("train"):
        # A class without training images still has its output (class ids stay those of the
        # mapping or folder list), but the user should hear of it: torchvision refuses this.
        present = {label for _, label in splits["train"]}
        skipped += [(os.path.join(train_dir, c), "class has no training images")
                    for i, c in enumerate(class_ids) if i not in present]
    return {"class_ids": class_ids, "class_names": class_names, "splits": splits,
            "skipped": sorted(skipped), "nested": nested}


def _label_flat_val(val_dir, names, meta_dir, class_index, skipped, has_folders):
    """Labels the flat Kaggle val/ folder from LOC_val_solution.csv (by file name stem);
    `has_folders`: val/ also holds (class) folders."""
    solution = os.path.join(meta_dir, VAL_SOLUTION) if meta_dir else None
    if not solution or not os.path.isfile(solution):
        raise DataError(f"{val_dir} holds images directly but {VAL_SOLUTION} is missing (looked in "
                        f"{meta_dir or os.path.dirname(val_dir)}): put it next to "
                        f"{SYNSET_MAPPING}, or sort val/ into class folders (valprep.sh)")
    labels = _read_val_solution(solution, class_index)
    pairs, seen = [], set()
    for name in names:
        image_id = _row_key(name, labels)
        wnid = labels.get(image_id)
        path = os.path.join(val_dir, name)
        if wnid is None:
            skipped.append((path, f"no row in {VAL_SOLUTION}"))
        elif not wnid:
            skipped.append((path, f"its row in {VAL_SOLUTION} has no label"))
        elif wnid not in class_index:
            skipped.append((path, f"label {wnid} not in {SYNSET_MAPPING}"))
        else:
            pairs.append((os.path.join(os.path.basename(val_dir), name), class_index[wnid]))
        seen.add(image_id)
    if names and not pairs and seen & set(labels):
        # Every file has a row, but no row's label is a class of the mapping.
        raise DataError(f"none of the {len(names):,} files in {val_dir} has a label that "
                        f"{SYNSET_MAPPING} lists (labels like "
                        f"{min([labels[i] for i in seen if labels.get(i)] or [''])!r}): use the "
                        f"{VAL_SOLUTION} and {SYNSET_MAPPING} of the same dataset")
    if labels and not seen & set(labels):
        # Not one file named as the CSV names images: the wrong CSV, or another naming scheme.
        raise DataError(f"none of the {len(names):,} files in {val_dir} has a row in {solution} "
                        f"(files like {sorted(names)[0]!r}, ImageIds like {min(labels)!r}): "
                        f"use that dataset's {VAL_SOLUTION}, or sort val/ into class folders")
    if not has_folders:
        # Rows without a file mean an incomplete extraction (unless valprep moved them); a link
        # to nothing is already reported as such (whatever its extension).
        reported = {_row_key(os.path.basename(path), labels) for path, _ in skipped
                    if os.path.dirname(path) == val_dir}
        # Named with the extension most of val/ has (Kaggle's .JPEG when it is empty).
        ext = collections.Counter(os.path.splitext(n)[1] for n in names).most_common(1)
        ext = ext[0][0] if ext and ext[0][0] else ".JPEG"
        skipped += [(os.path.join(val_dir, i if os.path.splitext(i)[1] else i + ext),
                     f"missing (listed in {VAL_SOLUTION})")
                    for i in sorted(set(labels) - seen - reported)]
    return pairs


def _row_key(name: str, labels: dict) -> str:
    """The CSV key of val/ file `name`: its whole name when a row has it (an ImageId with an
    extension that `_image_id` keeps, such as .jfif), else its stem (Kaggle's ImageIds)."""
    return name if name in labels else os.path.splitext(name)[0]


def screen_file(path: str, decode: bool = False) -> str:
    """Returns "" for a plausible image (see pipelines.formats), else why the file is skipped.

    `decode=True` then decodes a plausible file as the training pipeline does (TensorFlow).

    Reads only the first and last few bytes (the whole file when its tail has no end marker,
    `_has_end`): cheap enough for 1.28M files. CMYK JPEGs and PNGs named .JPEG pass (the decoder
    reads them by content).
    """
    try:
        with open(path, "rb") as f:
            head = f.read(formats.HEADER_BYTES)
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - TAIL_BYTES))
            tail = f.read()
    except OSError as e:
        return f"unreadable: {e.strerror or e}"
    if size == 0:
        return "empty file"
    kind = formats.image_format(head)
    if kind in formats.END_MARKERS and formats.END_MARKERS[kind] not in tail:
        try:
            ends = _has_end(path, kind)
        except OSError as e:
            return f"unreadable: {e.strerror or e}"
        if not ends:
            return f"truncated {kind} (no end marker)"
    if formats.is_animated_webp(head):  # TensorFlow cannot decode it
        return "animated WebP (TensorFlow decodes still images only; save its first frame)"
    if kind:
        return _decode_problem(path) if decode else ""
    for magic, name in UNSUPPORTED_MAGIC.items():
        if head.startswith(magic):
            return f"unsupported image format {name} (use {formats.NAMES})"
    return f"not an image (not {formats.NAMES})"


def _has_end(path: str, kind: str) -> bool:
    """Whether the image data of a JPEG or PNG whose tail lacks the end marker still ends: a
    decodable image may carry more than TAIL_BYTES after it (a phone's motion photo appends its
    video). A PNG's chunks are walked to IEND; a JPEG's segments to the start of the scan, then
    its end-of-image marker is looked for (an EXIF thumbnail before the scan has one of its own).
    Reads the whole file: only for these rare files."""
    with open(path, "rb") as f:
        data = f.read()
    if kind == "PNG":
        pos = 8   # after the signature: chunks of length, type, data, CRC
        while pos + 8 <= len(data):
            if data[pos + 4:pos + 8] == b"IEND":
                return True
            pos += 12 + int.from_bytes(data[pos:pos + 4], "big")
        return False
    pos = 2   # after the start-of-image marker
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xDA:   # start of scan: the entropy-coded data holds no bare FF D9
            return data.find(formats.END_MARKERS["JPEG"], pos) >= 0
        # Fill bytes and the markers without a length; the others carry theirs.
        pos += 1 if marker == 0xFF else 2 if marker in _JPEG_BARE_MARKERS else (
            2 + int.from_bytes(data[pos + 2:pos + 4], "big"))
    return False


_JPEG_BARE_MARKERS = frozenset({0x01, 0xD8, *range(0xD0, 0xD8)})


def _decode_problem(path: str) -> str:
    import tensorflow as tf

    from pipelines import preprocessing

    try:
        preprocessing.decode_image(tf.io.read_file(path))
    except tf.errors.OpError as e:
        return f"cannot be decoded: {formats.error_line(e.message) or type(e).__name__}"
    return ""


def _screen(paths: list[str], split: str = "", decode: bool = False) -> list[str]:
    """screen_file for every path, in parallel, with a progress bar for large lists."""
    from tqdm import tqdm

    if not paths:
        return []
    batch_size = SCREEN_BATCH if not decode else max(1, SCREEN_BATCH // 16)
    batches = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
    # Header checks wait on I/O: many threads. Decoding is CPU-bound (TensorFlow's kernels
    # release the GIL): a thread per core.
    threads = SCREEN_THREADS if not decode else os.cpu_count() or 1
    results = []
    with concurrent.futures.ThreadPoolExecutor(threads) as pool, tqdm(
            total=len(paths), unit=" files", file=sys.stderr, mininterval=1.0,
            desc=f"{'decoding' if decode else 'checking'} {split} images".replace("  ", " "),
            disable=len(paths) < PROGRESS_MIN_FILES and not decode) as bar:
        for batch in pool.map(lambda batch: [screen_file(p, decode) for p in batch], batches):
            results += batch
            bar.update(len(batch))
    return results


def _index_paths(data_dir: str, image_root: str, cache_dir: str | None) -> list[str]:
    """Where the index may live: DIR first, then the cache dir (for read-only data dirs)."""
    name = hashlib.sha256(image_root.encode()).hexdigest()[:16] + ".npz"
    return [os.path.join(data_dir, INDEX_FILE), os.path.join(cache_dir or DEFAULT_CACHE_DIR, name)]


def _save_index(index: dict, key: str, candidates: Iterable[str]) -> str | None:
    arrays = {"meta": np.frombuffer(json.dumps({
        "version": INDEX_VERSION, "key": key, "class_ids": index["class_ids"],
        "class_names": index["class_names"], "splits": sorted(index["splits"]),
        "nested": index["nested"],
    }).encode(), np.uint8)}
    for split, pairs in index["splits"].items():
        # One newline-joined blob: compact, and loading needs no pickle.
        arrays[f"{split}_files"] = np.frombuffer("\n".join(p for p, _ in pairs).encode(), np.uint8)
        arrays[f"{split}_labels"] = np.array([label for _, label in pairs], np.int64)
    arrays["skipped"] = np.frombuffer(
        "\n".join(f"{p}\t{r}" for p, r in index["skipped"]).encode(), np.uint8)
    for path in candidates:
        try:
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                np.savez_compressed(f, **arrays)  # readers see the old index or the new one
            return path
        except OSError:
            continue    # read-only data dir: try the cache dir
    return None


def _load_index(key: str, candidates: Iterable[str], image_root: str) -> dict | None:
    for path in candidates:
        try:
            with np.load(path) as z:
                meta = json.loads(z["meta"].tobytes())
                if meta.get("version") != INDEX_VERSION or meta.get("key") != key:
                    continue
                # The key holds the class folders' mtimes; sub-folders inside them are checked
                # here (none for ImageNet: nothing more to stat).
                if any(_mtime_ns(os.path.join(image_root, d)) != t
                       for d, t in meta["nested"].items()):
                    continue
                splits = {}
                for split in meta["splits"]:
                    blob = z[f"{split}_files"].tobytes().decode()
                    files = blob.split("\n") if blob else []
                    splits[split] = list(zip(files, z[f"{split}_labels"].tolist(), strict=True))
                blob = z["skipped"].tobytes().decode()
                skipped = [tuple(line.split("\t", 1)) for line in blob.split("\n")] if blob else []
            return {"class_ids": meta["class_ids"], "class_names": meta["class_names"],
                    "splits": splits, "skipped": skipped, "nested": meta["nested"]}
        except (OSError, ValueError, KeyError):
            continue    # missing or damaged cache: rebuild
    return None


def _mtime_ns(path: str) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


def _load_folder_source(name: str, data_dir: str, cache_dir: str | None, screen: str,
                        write_index: bool = True) -> Source:
    _check_extraction_finished(data_dir)
    image_root, meta_dir, layout = _find_layout(data_dir)
    if meta_dir:
        _check_extraction_finished(meta_dir)
    if screen not in formats.SCREENS:
        raise ValueError(f"screen={screen!r}; valid: {', '.join(formats.SCREENS)}")
    key = _tree_key(image_root, meta_dir) + ("" if screen == "header" else f":{screen}")
    candidates = _index_paths(data_dir, image_root, cache_dir)
    index = _load_index(key, candidates, image_root)
    if index is None:
        # The key is taken before listing, so a tree that changes while we list is re-indexed.
        index = _build_index(image_root, meta_dir, screen)
        if write_index:
            _save_index(index, key, candidates)

    def split_of(split):
        pairs = index["splits"].get(split)
        if pairs is None:
            return None
        files = np.empty(len(pairs), dtype=object)   # object: half the memory of a U array
        files[:] = [os.path.join(image_root, p) for p, _ in pairs]
        return Split(files=files, labels=np.array([lb for _, lb in pairs], np.int64))

    return Source(name=name, class_ids=list(index["class_ids"]),
                  class_names=list(index["class_names"]), train=split_of("train"),
                  val=split_of("val"), skipped=[tuple(s) for s in index["skipped"]],
                  layout=layout, root=image_root)


# ---------------------------------------------------------------------------------------------
# TFDS and synthetic


def _load_tfds(name: str, data_dir: str) -> Source:
    """Any TFDS image-classification dataset; images stay encoded (decoded in our pipeline).

    `data_dir` is the TFDS data dir; manual downloads (imagenet2012's ILSVRC2012_img_*.tar)
    go in `<data_dir>/downloads/manual`.
    """
    import tensorflow as tf
    import tensorflow_datasets as tfds

    tfds_dir = os.path.expanduser(data_dir) if data_dir else None
    try:
        import importlib_resources  # noqa: F401
    except ImportError:
        # tensorflow-datasets 4.9 imports it in download_and_prepare but declares it only for
        # Python < 3.9.
        raise DataError("tfds datasets need the importlib_resources package: "
                        "pip install importlib_resources") from None
    try:
        builder = tfds.builder(name, data_dir=tfds_dir)
        builder.download_and_prepare(
            download_dir=os.path.join(tfds_dir, "downloads") if tfds_dir else None)
    except Exception as e:   # TFDS raises many types; the user needs the one-line reason
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"tfds:{name} could not be prepared in {tfds_dir}: {first_line}") from e
    info = builder.info
    image_key, label_key = info.supervised_keys or ("image", "label")
    label_feature = info.features[label_key]
    if not hasattr(label_feature, "names") or image_key not in info.features:
        raise DataError(f"tfds:{name} is not an image classification dataset "
                        f"(features: {', '.join(info.features.keys())})")
    class_ids = list(label_feature.names)

    def split_of(split):
        if split is None:
            return None

        def records():
            ds = builder.as_dataset(split=split, shuffle_files=False,
                                    decoders={image_key: tfds.decode.SkipDecoding()})
            # In order whatever the pipeline's options say: positions are counted on it.
            return ds.map(lambda ex: (ex[image_key], tf.cast(ex[label_key], tf.int64)),
                          num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

        return Split(files=None, labels=None, records=records,
                     num_examples=int(info.splits[split].num_examples))

    names = set(info.splits.keys())
    val_split = next((s for s in ("validation", "test") if s in names), None)
    return Source(name=f"tfds:{name}", class_ids=class_ids, class_names=class_ids,
                  train=split_of("train" if "train" in names else None), val=split_of(val_split),
                  skipped=[], layout="tfds")


SHARDS_INFO = "dataset_info.json"
SHARDS_SPLITS = {"train": "train", "val": "validation"}   # ours -> TFDS's split names


def _load_shards(data_dir: str) -> Source:
    """The dataset `pipelines.prepare` wrote in `data_dir` (local or any tf.io.gfile path).

    Reads its TFDS metadata with tf.io.gfile rather than `tfds.builder_from_directory` (whose
    paths support local files, gs:// and s3:// but not every gfile filesystem).
    """
    import tensorflow as tf

    if not data_dir:
        raise DataError("--dataset=shards needs --data_dir=DIR, the --out of "
                        "`python -m pipelines.prepare`")
    root = data_dir.rstrip("/") if "://" in data_dir else os.path.abspath(
        os.path.expanduser(data_dir))

    def read(name, required=True):
        path = f"{root}/{name}"
        if not tf.io.gfile.exists(path):
            if not required:
                return None
            hint = ("its prepare did not finish: run the same `python -m pipelines.prepare` "
                    "command again" if tf.io.gfile.exists(f"{root}/.keras_resnet_prepare.json")
                    else f"write it with `python -m pipelines.prepare --data_dir=IMAGES "
                         f"--out={data_dir}`")
            raise DataError(f"{root} holds no prepared dataset (no {name}): {hint}")
        with tf.io.gfile.GFile(path, "rb") as f:
            return f.read().decode("utf-8")

    info = json.loads(read(SHARDS_INFO))
    if info.get("fileFormat", "tfrecord") != "tfrecord":
        raise DataError(f"{root}: file format {info.get('fileFormat')!r}; only tfrecord shards "
                        "are read: prepare them with `python -m pipelines.prepare`")
    class_ids = [line for line in read("label.labels.txt").splitlines() if line]
    metadata = json.loads(read("metadata.json", required=False) or "{}")
    class_names = metadata.get("class_names") or class_ids
    features = {"image": tf.io.FixedLenFeature([], tf.string),
                "label": tf.io.FixedLenFeature([], tf.int64)}

    def parse(serialized):
        example = tf.io.parse_single_example(serialized, features)
        return example["image"], example["label"]

    splits = {s["name"]: s for s in info.get("splits", [])}

    def split_of(tfds_name):
        split = splits.get(tfds_name)
        if split is None:
            return None
        lengths = tuple(int(n) for n in split.get("shardLengths", []))
        paths = tuple(f"{root}/{info['name']}-{tfds_name}.tfrecord-{i:05d}-of-{len(lengths):05d}"
                      for i in range(len(lengths)))
        shards = Shards(paths=paths, lengths=lengths, parse=parse)

        def records():
            return tf.data.TFRecordDataset(list(paths)).map(
                parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

        return Split(files=None, labels=None, records=records, num_examples=sum(lengths),
                     shards=shards)

    # What prepare left out (its skipped_files.tsv; absent in shards of earlier versions), so a
    # run on the shards reports it as a run on the files does.
    skipped = [tuple(line.split("\t", 1)) for line in
               (read(SKIPPED_REPORT, required=False) or "").split("\n")[1:] if "\t" in line]
    return Source(name=info["name"], class_ids=class_ids, class_names=list(class_names),
                  train=split_of(SHARDS_SPLITS["train"]), val=split_of(SHARDS_SPLITS["val"]),
                  skipped=skipped, layout="shards", root=root)


def _synthetic_source(dataset: str) -> Source:
    """Class ids only ("class_0000"...): the tensors come from pipelines.dataset."""
    num = dataset.partition(":")[2] or str(SYNTHETIC_NUM_CLASSES)
    if not num.isdigit() or int(num) < 1:
        raise DataError(f"bad dataset {dataset!r}: use synthetic or synthetic:N with N >= 1")
    ids = [f"class_{i:04d}" for i in range(int(num))]
    return Source(name="synthetic", class_ids=ids, class_names=ids, train=None, val=None,
                  skipped=[], layout="synthetic")
