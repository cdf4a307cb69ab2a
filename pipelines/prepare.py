"""Writes an image-folder dataset (Kaggle ImageNet or any ImageFolder tree) as TFDS record shards.

    python -m pipelines.prepare --data_dir=data/imagenet --out=data/imagenet_shards
    python -m pipelines.prepare --data_dir=data/imagenet --out=gs://BUCKET/imagenet_shards

The result is a TFDS dataset (`dataset_info.json`, `features.json`, TFRecord shards named
`NAME-{train,validation}.tfrecord-NNNNN-of-MMMMM`) that `tfds.builder_from_directory(OUT)` opens
and `train_main.py --dataset=shards --data_dir=OUT` trains from. Each record holds the file's
encoded bytes as they are (re-encoded to RGB JPEG, quality 100 as TFDS's `imagenet2012` does,
only when the file is not a 1- or 3-channel JPEG: CMYK JPEGs, PNG/GIF/BMP/WebP), the label
(`ClassLabel` whose names are the class ids; human names in `metadata.json`) and the file name
relative to the image root. Files are read through the same index and screening as training
from files (`pipelines.sources`), shuffled once with `--seed` so that each shard mixes classes,
and cut into shards of about `--shard_mb` MiB of images.

Resumable: each shard is written under a temporary name and renamed when complete, and the
hidden manifest `.keras_resnet_prepare.json` lists the finished ones, so running the same command
after a kill continues with the missing shards (the result is the same as an uninterrupted run).
`dataset_info.json`, which makes the directory a dataset to TFDS, is written last, after a verify
step that counts the records of every split against the source index.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import time
import uuid

import numpy as np
from absl import flags

from keras_resnet import cli
from keras_resnet.files import atomic_path, no_space_message, remove_stale_temps, write_bytes_atomic
from pipelines import formats, sources
from pipelines.layout import DataError

FORMAT_VERSION = 1
DATASET_VERSION = "1.0.0"
MANIFEST = ".keras_resnet_prepare.json"
ORDER_FILE = ".keras_resnet_prepare_order.npz"
DATASET_INFO = "dataset_info.json"
FILE_FORMAT = "tfrecord"
SPLITS = sources.SHARDS_SPLITS   # ours -> TFDS's ("validation", as imagenet2012 says)
DEFAULT_SHARD_MB = 128.0    # ~1040 train / ~50 validation shards for ImageNet (~140 + 6.4 GB)
REPAIR_QUALITY = 100        # what TFDS's imagenet2012 uses for its CMYK and PNG repairs
SIZE_SAMPLE = 2000          # files whose sizes estimate a split's bytes (for the shard count)
PROGRESS_EVERY = 32         # images between a worker's progress reports
SPACE_MARGIN = 1.05         # free space wanted over the estimated bytes still to write
_TEMP_PREFIX = ".tmp-"


# ---------------------------------------------------------------------------------------------
# Paths: local or any tf.io.gfile filesystem (gs://, ram://, ...)


def _is_remote(path: str) -> bool:
    return "://" in path


def _join(directory: str, name: str) -> str:
    return f"{directory.rstrip('/')}/{name}" if _is_remote(directory) else os.path.join(
        directory, name)


@contextlib.contextmanager
def _atomic_out(path: str):
    """Like keras_resnet.files.atomic_path, also for gfile paths (gs:// renames are copies)."""
    if not _is_remote(path):
        with atomic_path(path) as tmp:
            yield tmp
        return
    import tensorflow as tf

    directory, name = path.rsplit("/", 1)
    tmp = f"{directory}/{_TEMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}-{name}"
    try:
        yield tmp
        tf.io.gfile.rename(tmp, path, overwrite=True)
    finally:
        if tf.io.gfile.exists(tmp):
            tf.io.gfile.remove(tmp)


def _write_out(path: str, data: bytes) -> None:
    if not _is_remote(path):
        write_bytes_atomic(path, data)
        return
    import tensorflow as tf

    with _atomic_out(path) as tmp, tf.io.gfile.GFile(tmp, "wb") as f:
        f.write(data)


def _read_out(path: str) -> bytes | None:
    import tensorflow as tf

    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path, "rb") as f:
        return f.read()


# ---------------------------------------------------------------------------------------------
# Records


def jpeg_components(data: bytes) -> int | None:
    """Colour components of a JPEG (1 grey, 3 YCbCr/RGB, 4 CMYK/YCCK) from its frame header."""
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:         # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:   # markers without a length
            i += 2
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn (not DHT/JPG/DAC)
            return data[i + 9]
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def needs_repair(data: bytes) -> bool:
    """True unless `data` is a grey or colour JPEG that every JPEG decoder reads as it is."""
    return formats.image_format(data[:formats.HEADER_BYTES]) != "JPEG" or jpeg_components(
        data) not in (1, 3)


def repaired_jpeg(data: bytes) -> bytes:
    """`data` (any format the pipelines read) decoded to RGB and encoded as a JPEG."""
    import tensorflow as tf

    from pipelines import preprocessing

    image = preprocessing.decode_image(tf.constant(data))
    # Full-resolution chroma: 4:2:0 subsampling alone moves a noisy pixel by ~10 levels.
    return tf.io.encode_jpeg(image, format="rgb", quality=REPAIR_QUALITY,
                             chroma_downsampling=False).numpy()


def serialize_record(image: bytes, label: int, file_name: str) -> bytes:
    """A tf.train.Example as TFDS serializes FeaturesDict(image=Image, label=ClassLabel,
    file_name=Text): one bytes feature, one int64 feature, one bytes feature."""
    import tensorflow as tf

    feature = {
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
        "file_name": tf.train.Feature(bytes_list=tf.train.BytesList(value=[file_name.encode()])),
    }
    # deterministic: map entries in key order (else in a hash order that differs by process, and a
    # resumed prepare would write other bytes than an uninterrupted one).
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(
        deterministic=True)


def features(class_ids):
    """The TFDS features of the records (see serialize_record)."""
    import tensorflow_datasets as tfds

    return tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
        "label": tfds.features.ClassLabel(names=list(class_ids)),
        "file_name": tfds.features.Text(),
    })


_progress = None   # a worker's shared image counter (set by _init_worker)


def _init_worker(counter):
    global _progress
    _progress = counter
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from keras_resnet import logs

    logs.import_tensorflow()  # each worker imports TensorFlow: without its start-up noise


def _count(n):
    if _progress is not None:
        with _progress.get_lock():
            _progress.value += n


def write_shard(path: str, image_root: str, items: list[tuple[str, int]]) -> dict:
    """Writes the (relative path, label) items as one shard at `path` (atomically). Returns
    {"num_examples", "num_bytes", "repaired", "failed": [[file, reason], ...]}."""
    import tensorflow as tf

    stats = {"num_examples": 0, "num_bytes": 0, "repaired": 0, "failed": []}
    pending = 0
    with _atomic_out(path) as tmp, tf.io.TFRecordWriter(tmp) as writer:
        for rel, label in items:
            try:
                with open(os.path.join(image_root, rel), "rb") as f:
                    data = f.read()
                if needs_repair(data):
                    data = repaired_jpeg(data)
                    stats["repaired"] += 1
            except (OSError, tf.errors.OpError) as e:
                # Only a file that changed since the index was built (or a decoder failure on a
                # file that needed repair) gets here: left out, counted, and named.
                stats["failed"].append([rel, str(getattr(e, "message", e)).splitlines()[0]])
                continue
            record = serialize_record(data, label, rel)
            writer.write(record)
            stats["num_examples"] += 1
            stats["num_bytes"] += len(record)
            pending += 1
            if pending == PROGRESS_EVERY:
                _count(pending)
                pending = 0
    _count(pending + len(stats["failed"]))
    return stats


# ---------------------------------------------------------------------------------------------
# Plan and manifest


def _relative(source, split) -> list[str]:
    prefix = source.root.rstrip(os.sep) + os.sep
    return [f[len(prefix):] if f.startswith(prefix) else f for f in split.files]


def source_fingerprint(source) -> str:
    """Hash of the class ids and every split's relative file names and labels."""
    digest = hashlib.sha256(json.dumps(source.class_ids).encode())
    for name in SPLITS:
        split = getattr(source, name)
        if split is not None:
            digest.update(f"\n{name}\n".encode() + "\n".join(_relative(source, split)).encode())
            digest.update(np.asarray(split.labels, np.int64).tobytes())
    return digest.hexdigest()


def estimate_bytes(files) -> int:
    """About how many bytes `files` hold: the mean size of an even sample times the count."""
    if len(files) == 0:
        return 0
    picked = np.linspace(0, len(files) - 1, min(SIZE_SAMPLE, len(files))).astype(int)
    return int(np.mean([os.path.getsize(files[i]) for i in picked]) * len(files))


def shard_bounds(num_examples: int, num_shards: int) -> list[tuple[int, int]]:
    """[start, end) of each shard in the write order: sizes differ by at most one."""
    return [(i * num_examples // num_shards, (i + 1) * num_examples // num_shards)
            for i in range(num_shards)]


def shard_name(name: str, split: str, index: int, num_shards: int) -> str:
    """TFDS's default file name ({DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y})."""
    return f"{name}-{split}.{FILE_FORMAT}-{index:05d}-of-{num_shards:05d}"


def make_plan(source, name: str, seed: int, shard_mb: float) -> dict:
    """What the output will hold, fixed at the first run (the manifest's header)."""
    splits = {}
    for ours, tfds_name in SPLITS.items():
        split = getattr(source, ours)
        if split is None or split.num_examples == 0:
            continue
        total = estimate_bytes(split.files)
        num_shards = max(1, min(split.num_examples, round(total / (shard_mb * 2**20))))
        splits[tfds_name] = {"num_examples": int(split.num_examples), "num_shards": num_shards,
                             "estimated_bytes": total}
    return {"format_version": FORMAT_VERSION, "name": name, "seed": seed,
            "fingerprint": source_fingerprint(source), "data_dir": source.root,
            "class_ids": list(source.class_ids), "splits": splits, "done": {s: {} for s in splits}}


def _write_orders(out, plan):
    """The seeded write order of each split, stored once (numpy's permutation algorithm may
    change between versions; a resumed prepare must use the first run's order)."""
    path = _join(out, ORDER_FILE)
    data = _read_out(path)
    if data is not None:
        with np.load(io.BytesIO(data)) as z:
            return {k: z[k] for k in z.files}
    rng = np.random.default_rng(plan["seed"])
    orders = {s: rng.permutation(info["num_examples"]) for s, info in plan["splits"].items()}
    buf = io.BytesIO()
    np.savez(buf, **orders)
    _write_out(path, buf.getvalue())
    return orders


def _open_plan(out, plan) -> dict:
    """The manifest in `out` if it is for the same plan (resume), else `plan`; refuses an output
    directory holding anything else."""
    import tensorflow as tf

    raw = _read_out(_join(out, MANIFEST))
    if raw is not None:
        old = json.loads(raw)
        same = all(old.get(k) == plan[k] for k in ("format_version", "name", "seed",
                                                    "fingerprint", "class_ids"))
        same = same and {s: v["num_shards"] for s, v in old["splits"].items()} == {
            s: v["num_shards"] for s, v in plan["splits"].items()}
        if not same:
            raise DataError(f"{out} already holds a different dataset (prepared from "
                            f"{old.get('data_dir')}, name {old.get('name')}, seed "
                            f"{old.get('seed')}): choose another --out, or delete it")
        return old
    if tf.io.gfile.isdir(out):
        ours = re.compile(re.escape(plan["name"]) + r"-(train|validation)\.")
        foreign = [n for n in tf.io.gfile.listdir(out)
                   if not n.startswith(_TEMP_PREFIX) and n.rstrip("/") != ORDER_FILE
                   and not ours.match(n)]
        if foreign:
            raise DataError(f"{out} is not empty and was not written by pipelines.prepare "
                            f"(holds {sorted(foreign)[0]}): choose an empty or new --out")
    return plan


# ---------------------------------------------------------------------------------------------
# The command


def prepare(data_dir: str, out: str, *, name: str = "", seed: int = 0,
            shard_mb: float = DEFAULT_SHARD_MB, workers: int = 0, verify: bool = True,
            screen: str = "header", stop_after_shards: int | None = None) -> dict:
    """Writes (or completes) the dataset in `out`; returns the manifest.

    `stop_after_shards` (tests) stops, as a kill would, after that many new shards.
    """
    import tensorflow as tf

    source = sources.load_source("imagenet", data_dir, screen=screen)
    name = name or default_name(source)
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise DataError(f"--name={name!r}: use lower case letters, digits and _ (a TFDS name)")
    out = out.rstrip("/") if _is_remote(out) else os.path.abspath(os.path.expanduser(out))
    plan = _open_plan(out, make_plan(source, name, seed, shard_mb))
    info_path = _join(out, DATASET_INFO)
    if tf.io.gfile.exists(info_path) and all(
            len(plan["done"][s]) == v["num_shards"] for s, v in plan["splits"].items()):
        print(f"{out} already holds this dataset, complete.", file=sys.stderr)
        _report_skipped(out, source, plan, write=False)
        return plan
    tf.io.gfile.makedirs(out)
    if not _is_remote(out):
        remove_stale_temps(out)
    orders = _write_orders(out, plan)
    _write_out(_join(out, MANIFEST), json.dumps(plan, indent=1, sort_keys=True).encode())

    tasks = []
    for ours, tfds_name in SPLITS.items():
        if tfds_name not in plan["splits"]:
            continue
        split, info = getattr(source, ours), plan["splits"][tfds_name]
        rel, labels, order = _relative(source, split), split.labels, orders[tfds_name]
        for i, (lo, hi) in enumerate(shard_bounds(info["num_examples"], info["num_shards"])):
            if str(i) not in plan["done"][tfds_name]:
                items = [(rel[j], int(labels[j])) for j in order[lo:hi]]
                tasks.append((tfds_name, i, _join(out, shard_name(name, tfds_name, i,
                                                                  info["num_shards"])), items))
    _check_space(out, plan)
    _write_tasks(out, plan, source.root, tasks, workers, stop_after_shards)
    if stop_after_shards is not None and tasks[stop_after_shards:]:
        return plan
    if verify:
        verify_counts(out, plan)
    _report_skipped(out, source, plan)
    write_metadata(out, plan, source.class_names)
    return plan


def _report_skipped(out, source, plan, write: bool = True) -> None:
    """What the dataset leaves out, as training from the files reports it: a warning with the
    count, and `OUT/skipped_files.tsv` listing each file or folder with its reason (the index's
    screening, and files that could not be read while the shards were written)."""
    skipped = list(source.skipped) + [
        (os.path.join(source.root, rel), f"could not be read while writing the shards: {why}")
        for split in plan["done"].values() for done in split.values()
        for rel, why in done["failed"]]
    report = _join(out, sources.SKIPPED_REPORT)
    if write:
        lines = ["path\treason\n"] + [f"{p}\t{why}\n" for p, why in sorted(skipped)]
        _write_out(report, "".join(lines).encode("utf-8"))
    if skipped:
        print(f"WARNING: left out {len(skipped):,} files or folders (each with its reason in "
              f"{report})", file=sys.stderr)


def default_name(source) -> str:
    """imagenet_kaggle / imagenet_folder for ImageNet; the folder's name for other data."""
    if len(source.class_ids) == 1000 and source.class_ids[0] == "n01440764":
        return f"imagenet_{'kaggle' if source.layout == 'kaggle' else 'folder'}"
    base = os.path.basename(source.root.rstrip(os.sep))
    if base == "CLS-LOC":
        base = os.path.basename(os.path.dirname(os.path.dirname(os.path.dirname(source.root))))
    name = re.sub(r"[^a-z0-9_]+", "_", base.lower()).strip("_") or "images"
    return name if name[0].isalpha() else f"d_{name}"


def _check_space(out, plan):
    if _is_remote(out):
        return
    left = sum(info["estimated_bytes"] * (1 - len(plan["done"][s]) / info["num_shards"])
               for s, info in plan["splits"].items())
    free = shutil.disk_usage(out).free
    if free < left * SPACE_MARGIN:
        raise DataError(f"no space for the shards: {out} has {_size(free)} free, the rest of "
                        f"the dataset needs about {_size(left)}; free space and run the same "
                        "command again (finished shards are kept)")


def _size(n):
    """1.5 GiB, 12.0 MiB, 40.2 KiB: a small dataset's need is not '0.0 GiB'."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n / 2**10:.1f} KiB"


def _write_tasks(out, plan, image_root, tasks, workers, stop_after):
    """Writes the shards in a process pool, recording each in the manifest as it completes."""
    from tqdm import tqdm

    if stop_after is not None:
        tasks = tasks[:stop_after]
    if not tasks:
        return
    workers = workers or os.cpu_count() or 1
    total = sum(len(t[3]) for t in tasks)
    bar = tqdm(total=total, unit=" img", desc="writing shards", file=sys.stderr, smoothing=0.05,
               mininterval=1.0)
    if workers == 1:   # in this process: also the way to write to a per-process ram:// path
        with bar:
            for split, i, path, items in tasks:
                plan["done"][split][str(i)] = write_shard(path, image_root, items)
                bar.update(len(items))
                _write_out(_join(out, MANIFEST), json.dumps(plan, indent=1, sort_keys=True).encode())
        return
    counter = multiprocessing.get_context("spawn").Value("q", 0)
    # spawn: the parent has TensorFlow loaded (the index), which fork would copy in a bad state.
    with bar, concurrent.futures.ProcessPoolExecutor(
            max_workers=min(workers, len(tasks)), mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker, initargs=(counter,)) as pool:
        futures = {pool.submit(write_shard, path, image_root, items): (split, i)
                   for split, i, path, items in tasks}
        pending = set(futures)
        try:
            while pending:
                finished, pending = concurrent.futures.wait(
                    pending, timeout=1.0, return_when=concurrent.futures.FIRST_COMPLETED)
                bar.update(counter.value - bar.n)
                for future in finished:
                    split, i = futures[future]
                    plan["done"][split][str(i)] = future.result()
                if finished:
                    _write_out(_join(out, MANIFEST), json.dumps(plan, indent=1, sort_keys=True).encode())
        except BaseException:
            for future in pending:
                future.cancel()
            raise


def verify_counts(out, plan) -> None:
    """Reads every shard back and checks each split's record count against the source index
    (less the files that could not be read while writing)."""
    from tqdm import tqdm

    shards = [(s, _join(out, shard_name(plan["name"], s, i, info["num_shards"])))
              for s, info in plan["splits"].items() for i in range(info["num_shards"])]
    counts = {}
    with tqdm(total=len(shards), unit=" shards", desc="verifying", file=sys.stderr,
              mininterval=1.0) as bar:
        for (split, _), n in zip(shards, _count_records([p for _, p in shards]), strict=True):
            counts[split] = counts.get(split, 0) + n
            bar.update(1)
    for split, info in plan["splits"].items():
        failed = sum(len(d["failed"]) for d in plan["done"][split].values())
        want = info["num_examples"] - failed
        if counts.get(split, 0) != want:
            raise DataError(f"verify: {split} has {counts.get(split, 0)} records, the source "
                            f"index {want}: delete {out} and prepare again")


def _count_records(paths):
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices(paths).map(
        lambda p: tf.data.TFRecordDataset(p, buffer_size=8 << 20).reduce(
            tf.constant(0, tf.int64), lambda n, _: n + 1),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    for n in ds.as_numpy_iterator():
        yield int(n)


def write_metadata(out, plan, class_names) -> None:
    """dataset_info.json, features.json, label and metadata files, dataset_info.json last."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import dataset_info, file_adapters, naming

    tmp = tempfile.mkdtemp(prefix="prepare-metadata-")
    # TFDS paths go through etils.epath, which knows local, gs:// and s3:// but not every gfile
    # filesystem: describe the dataset in a local folder, then copy the files to `out`.
    template = naming.ShardedFileTemplate(data_dir=tmp, dataset_name=plan["name"],
                                          filetype_suffix=FILE_FORMAT)
    split_infos = []
    for split, info in plan["splits"].items():
        done = [plan["done"][split][str(i)] for i in range(info["num_shards"])]
        split_infos.append(tfds.core.SplitInfo(
            name=split, shard_lengths=[d["num_examples"] for d in done],
            num_bytes=sum(d["num_bytes"] for d in done),
            filename_template=template.replace(split=split)))
    info = dataset_info.DatasetInfo(
        builder=dataset_info.DatasetIdentity(name=plan["name"],
                                             version=tfds.core.Version(DATASET_VERSION),
                                             data_dir=tmp, module_name=""),
        description=f"Images of {plan['data_dir']} as encoded bytes with labels and file names, "
                    "written by keras_resnet's pipelines.prepare.",
        features=features(plan["class_ids"]),
        supervised_keys=("image", "label"),
        metadata=tfds.core.MetadataDict(class_names=list(class_names),
                                        prepare_seed=plan["seed"],
                                        source_fingerprint=plan["fingerprint"]),
    )
    info.set_file_format(file_adapters.FileFormat.TFRECORD)
    info.set_splits(tfds.core.SplitDict(split_infos))
    try:
        info.write_to_directory(tmp)
        names = sorted(os.listdir(tmp), key=lambda n: (n == DATASET_INFO, n))
        for n in names:   # dataset_info.json last: its presence means the dataset is complete
            with open(os.path.join(tmp, n), "rb") as f:
                _write_out(_join(out, n), f.read())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def define_flags(values):
    flags.DEFINE_string("data_dir", "data/imagenet", "The Kaggle ImageNet tree or an ImageFolder "
                        "root (train/<class>/*, val/<class>/*).", flag_values=values)
    flags.DEFINE_string("out", None, "Output directory (local, gs://..., any tf.io.gfile path).",
                        flag_values=values)
    flags.DEFINE_string("name", "", "TFDS dataset name (default: imagenet_kaggle, "
                        "imagenet_folder, or the data folder's name).", flag_values=values)
    flags.DEFINE_integer("seed", 0, "Seed of the write-time shuffle.", flag_values=values)
    flags.DEFINE_float("shard_mb", DEFAULT_SHARD_MB, "Target MiB of images per shard.",
                       flag_values=values)
    flags.DEFINE_integer("workers", 0, "Writer processes (0: one per core).", flag_values=values)
    flags.DEFINE_bool("verify", True, "Read the shards back and count records per split.",
                      flag_values=values)
    flags.DEFINE_enum("check_images", "header", formats.SCREENS, "Per-file check when indexing "
                      "(as train_main.py's --check_images).", flag_values=values)


def main(flag_values, args):
    v = flag_values
    if not v.out:
        raise cli.UsageError("--out is required, e.g. --out=data/imagenet_shards or gs://B/DIR")
    if v.shard_mb <= 0:
        raise cli.UsageError(f"--shard_mb={v.shard_mb}; use a positive size in MiB")
    from keras_resnet import logs

    logs.import_tensorflow()  # before any TensorFlow import: without its start-up noise
    start = time.monotonic()
    try:
        plan = prepare(v.data_dir, v.out, name=v.name, seed=v.seed, shard_mb=v.shard_mb,
                       workers=v.workers, verify=v.verify, screen=v.check_images)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # a full disk, from Python's writes or TensorFlow's (an OpError)
        message = no_space_message(e, v.out, "finished shards are kept")
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 1
    counts = ", ".join(f"{s} {i['num_examples']:,} images in {i['num_shards']} shards"
                       for s, i in plan["splits"].items())
    print(f"wrote {v.out}: {counts} ({time.monotonic() - start:.0f} s); train with "
          f"--dataset=shards --data_dir={v.out}", file=sys.stderr)
    return 0


def run(argv=None):
    return cli.run(define_flags, main, argv, prog="pipelines.prepare", doc=__doc__)


if __name__ == "__main__":
    sys.exit(run())
