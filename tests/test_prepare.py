"""pipelines.prepare (image folders -> TFDS record shards) and training from the shards:
record counts and (file name, label) pairs against the source index, repairs, TFDS compatibility,
an interrupted prepare finishing to the same bytes, bad output directories, record-exact resume
of the shard stream, per-pipeline shard ownership, equality with the files, ram:// paths."""

import collections
import dataclasses
import hashlib
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from pipelines import dataset as ds_lib
from pipelines import prepare, sources
from pipelines.layout import DataError
from tests.kaggle_tree import make_kaggle_tree

SHARD_MB = 0.002   # ~2 KiB of 40-px JPEGs per shard: about 12 train shards


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "imagenet"
    return make_kaggle_tree(root, num_classes=3, train_per_class=6, val_per_class=2,
                            image_size=40)   # 18 + CMYK + PNG train, 6 val, 3 broken


@pytest.fixture(scope="module")
def out(tree, tmp_path_factory):
    """The tree prepared by two worker processes."""
    path = str(tmp_path_factory.mktemp("shards") / "out")
    prepare.prepare(tree["root"], path, shard_mb=SHARD_MB, workers=2)
    return path


def _records(path, split):
    """(file name, label, image bytes) of every record of `split`, via TFDS's own reader."""
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(path)
    ds = builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    return [(ex["file_name"].decode(), int(ex["label"]), ex["image"])
            for ex in tfds.as_numpy(ds)]


def _files(tree, split):
    return {os.path.relpath(p, tree["image_root"]): label for p, label in tree[split].items()}


def _dataset_files(path):
    """{name: sha256} of every file a reader sees (temporary names excluded)."""
    return {n: hashlib.sha256(open(os.path.join(path, n), "rb").read()).hexdigest()
            for n in sorted(os.listdir(path)) if not n.startswith(".tmp-")}


def test_records_are_the_readable_files_each_once(tree, out):
    for split, tfds_split in (("train", "train"), ("val", "validation")):
        records = _records(out, tfds_split)
        pairs = collections.Counter((name, label) for name, label, _ in records)
        assert len(records) == len(tree[split])          # the broken files are left out
        assert pairs == collections.Counter(_files(tree, split).items())
    source = sources.load_source("shards", out)
    assert source.class_ids == tree["class_ids"] and source.class_names == tree["class_names"]
    assert source.train.num_examples == 20 and source.val.num_examples == 6
    assert len(source.train.shards.paths) > 5            # several shards, each mixing classes
    labels = [label for _, label, _ in _records(out, "train")]
    assert labels != sorted(labels)


def test_the_files_left_out_are_counted_and_listed(tree, out, capsys):
    # As training from the files does (skipped_files.tsv in its run folder): the shards had
    # dropped the truncated, empty and non-image files without a word.
    with open(os.path.join(out, sources.SKIPPED_REPORT), encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t") for line in f]
    assert rows[0] == ["path", "reason"]
    assert {p: r for p, r in rows[1:]} == dict(sources.load_source("imagenet", tree["root"]).skipped)
    for path, reason in tree["broken"].items():
        assert reason in dict(rows[1:])[path]
    # A run on the shards reads the list (and writes it into its run folder, with a warning).
    assert sources.load_source("shards", out).skipped == [tuple(row) for row in rows[1:]]
    # The command says so, also when the dataset is already complete (nothing rewritten).
    assert prepare.run([f"--data_dir={tree['root']}", f"--out={out}",
                        f"--shard_mb={SHARD_MB}", "--workers=1"]) == 0
    err = capsys.readouterr().err
    assert (f"WARNING: left out {len(rows) - 1} files or folders (each with its reason in "
            f"{os.path.join(out, sources.SKIPPED_REPORT)})") in err


def test_only_files_that_need_it_are_reencoded(tree, out):
    stored = {name: image for name, _, image in _records(out, "train")}
    for path in tree["train"]:
        name, raw = os.path.relpath(path, tree["image_root"]), open(path, "rb").read()
        if path in (tree["cmyk"], tree["png"]):
            assert stored[name] != raw and prepare.jpeg_components(stored[name]) == 3
            a = tf.io.decode_image(stored[name], channels=3).numpy().astype(int)
            b = tf.io.decode_image(raw, channels=3).numpy().astype(int)
            assert a.shape == b.shape and np.abs(a - b).mean() < 4.0   # quality 100, on noise
        else:
            assert stored[name] == raw                  # bytes kept as they were


def test_tfds_reads_it_as_a_dataset(out, tree):
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(out)
    assert builder.info.features["label"].names == tree["class_ids"]
    assert list(builder.info.metadata["class_names"]) == tree["class_names"]
    assert builder.info.splits["train"].num_examples == 20
    image = next(iter(builder.as_dataset(split="validation")))["image"]
    assert image.dtype == tf.uint8 and image.shape[-1] == 3


def test_an_interrupted_prepare_finishes_to_the_same_dataset(tree, out, tmp_path, monkeypatch):
    path = str(tmp_path / "out")
    calls = {"n": 0}
    original = prepare.serialize_record

    def fail_on_the_ninth_record(*args):
        calls["n"] += 1
        if calls["n"] == 9:
            raise KeyboardInterrupt   # what a kill does to this process, mid-shard
        return original(*args)

    monkeypatch.setattr(prepare, "serialize_record", fail_on_the_ninth_record)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare(tree["root"], path, shard_mb=SHARD_MB, workers=1)
    # What a SIGKILL leaves besides: a half-written shard under a dead process's temp name.
    with open(os.path.join(path, ".tmp-999999999-abcd1234-x-train.tfrecord-00009-of-00012"),
              "wb") as f:
        f.write(b"torn")
    done = [n for n in os.listdir(path) if ".tfrecord-" in n and not n.startswith(".")]
    assert 0 < len(done) < len([n for n in os.listdir(out) if ".tfrecord-" in n])
    with pytest.raises(DataError, match="did not finish"):
        sources.load_source("shards", path)       # no reader takes it for a dataset yet
    monkeypatch.setattr(prepare, "serialize_record", original)
    prepare.prepare(tree["root"], path, shard_mb=SHARD_MB, workers=1)
    assert _dataset_files(path) == _dataset_files(out)   # and one process == two processes


def test_bad_outputs_and_inputs_give_one_line_errors_and_keep_the_dataset(tree, out, tmp_path,
                                                                          monkeypatch, capsys):
    copy = str(tmp_path / "copy")
    shutil.copytree(out, copy)
    before = _dataset_files(copy)
    with pytest.raises(DataError, match="already holds a different dataset"):
        prepare.prepare(tree["root"], copy, shard_mb=SHARD_MB, seed=1, workers=1)
    assert _dataset_files(copy) == before
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not written by pipelines.prepare"):
        prepare.prepare(tree["root"], str(foreign), shard_mb=SHARD_MB, workers=1)
    (tmp_path / "flat").mkdir()
    assert prepare.run([f"--data_dir={tmp_path / 'flat'}", f"--out={tmp_path / 'o'}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no train/ or val/ folder")

    Usage = collections.namedtuple("Usage", "total used free")
    monkeypatch.setattr(prepare.shutil, "disk_usage", lambda _: Usage(1 << 30, 1 << 30, 100))
    assert prepare.run([f"--data_dir={tree['root']}", f"--out={tmp_path / 'full'}",
                        f"--shard_mb={SHARD_MB}", "--workers=1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no space for the shards" in err[0]
    assert " has 0.1 KiB free, the rest of the dataset needs about " in err[0]
    assert not err[0].split("needs about ")[1].startswith("0.0 ")  # a tiny dataset, in MiB
    assert not any(".tfrecord-" in n for n in os.listdir(tmp_path / "full"))
    monkeypatch.undo()
    # The disk fills while writing (the estimate is from the source files' sizes): one line.
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "full" / "train.tfrecord-00001"))

    with monkeypatch.context() as patch:
        patch.setattr(prepare, "prepare", disk_full)
        assert prepare.run([f"--data_dir={tree['root']}", f"--out={tmp_path / 'full'}"]) == 1
    assert capsys.readouterr().err == (
        f"error: no space left on device writing {tmp_path / 'full' / 'train.tfrecord-00001'}; "
        "free space and run the same command again (finished shards are kept).\n")
    # Run again on a complete dataset: nothing rewritten.
    prepare.prepare(tree["root"], copy, shard_mb=SHARD_MB, workers=1)
    assert _dataset_files(copy) == before


def test_repeated_augmentation_of_records_is_refused_at_once(out):
    """Shards are read in record order: there is no file permutation to repeat from. It raised a
    traceback from the input pipeline, after the model was built."""
    from keras_resnet.training import inputs
    from keras_resnet.training.config import Config

    config = Config(dataset="shards", data_dir=out, repeated_aug=2, batch_size=4)
    with pytest.raises(inputs.UserError, match=r"^--repeated_aug=2 needs a dataset of image files "
                       r".*--dataset=shards is read as records: use --repeated_aug=1"):
        inputs.load_data(config)
    assert inputs.load_data(dataclasses.replace(config, repeated_aug=1)).steps_per_epoch > 0


def test_round_robin_state():
    # Shards of 1, 3, 2 records read in turn: a0 b0 c0 | b1 c1 | b2.
    assert [tuple(o) + (n,) for o, n in (ds_lib.round_robin_state([1, 3, 2], k)
                                          for k in range(6))] == [
        (0, 0, 0, 0), (1, 0, 0, 1), (1, 1, 0, 2), (1, 1, 1, 1), (1, 2, 1, 2), (1, 2, 2, 1)]


@pytest.fixture
def small_windows(monkeypatch):
    """Windows and cycles smaller than the dataset, so resume crosses both."""
    monkeypatch.setattr(ds_lib, "SHUFFLE_WINDOW", 4)
    monkeypatch.setattr(ds_lib, "SHARD_CYCLE", 3)


def _stream(shards, skip=0, pipeline=(0, 1), epochs=2, per_epoch=20, seed=5):
    ds = ds_lib._shard_positions(shards, per_epoch, seed, 0, epochs, skip, *pipeline)
    return [(int(e), int(p), hashlib.sha1(raw).hexdigest(), int(label))
            for e, p, raw, label in ds.as_numpy_iterator()]


def test_shard_stream_resumes_at_every_record(out, small_windows):
    shards = sources.load_source("shards", out).train.shards
    full = _stream(shards)
    for epoch in (0, 1):   # each epoch: every record once, in an order of its own
        assert sorted(x[2] for x in full if x[0] == epoch) == sorted(
            hashlib.sha1(r).hexdigest() for _, _, r in _records(out, "train"))
    assert [x[2] for x in full if x[0] == 0] != [x[2] for x in full if x[0] == 1]
    assert [x[1] for x in full] == list(range(20)) * 2
    for skip in range(20):
        assert _stream(shards, skip) == [x for x in full if x[0] > 0 or x[1] >= skip], skip
    assert _stream(shards, seed=6) != full


def test_input_pipelines_read_their_own_shards_or_split_records(out, small_windows):
    shards = sources.load_source("shards", out).train.shards   # 12 shards of 1-2 records
    by_record = {h: i for i, (_, _, raw) in enumerate(_records(out, "train"))
                 for h in [hashlib.sha1(raw).hexdigest()]}
    parts = [_stream(shards, pipeline=(i, 2), per_epoch=16) for i in range(2)]
    for i, part in enumerate(parts):
        assert [x[1] for x in part if x[0] == 0] == list(range(i, 16, 2))
    first = [{x[2] for x in part if x[0] == 0} for part in parts]
    assert not first[0] & first[1] and len(first[0] | first[1]) == 16
    # Resume of one pipeline: the tail of its uninterrupted stream.
    assert _stream(shards, skip=6, pipeline=(1, 2), per_epoch=16) == [
        x for x in parts[1] if x[0] > 0 or x[1] >= 6]
    # Three shards for two pipelines cannot be split by shard: every pipeline reads all shards
    # and keeps every other record.
    few = sources.Shards(paths=shards.paths[:3], lengths=shards.lengths[:3], parse=shards.parse)
    parts = [_stream(few, pipeline=(i, 2), per_epoch=4, epochs=1) for i in range(2)]
    assert [x[1] for x in parts[0]] == [0, 2] and [x[1] for x in parts[1]] == [1, 3]
    assert len({x[2] for x in parts[0] + parts[1]} & set(by_record)) == 4


def _batches(split, **kwargs):
    kwargs = {"global_batch_size": 4, "image_size": 32, "seed": 3, "num_epochs": 2,
              "deterministic": True, **kwargs}
    return [(x.numpy(), y.numpy()) for x, y in ds_lib.build_train_dataset(split, **kwargs)]


def test_training_batches_resume_exactly(out, small_windows):
    split = sources.load_source("shards", out).train
    full = _batches(split)
    assert len(full) == 10
    for skip in (2, 6):
        tail = _batches(split, skip_steps=skip)
        assert len(tail) == len(full) - skip
        for (xa, ya), (xb, yb) in zip(tail, full[skip:], strict=True):
            np.testing.assert_array_equal(xa, xb)
            np.testing.assert_array_equal(ya, yb)


def test_unordered_decoding_gives_the_ordered_batches_and_resumes_exactly(out, small_windows):
    """deterministic=False (the default) decodes records in parallel, still in order: no record
    moves to another batch, so mixed batches equal deterministic ones pixel for pixel and a
    resume (which skips batches by count) trains exactly the rest of the epoch."""
    from pipelines import augment

    source = sources.load_source("shards", out)
    mix = {"mix": augment.BatchMix(mixup_alpha=0.4, cutmix_alpha=1.0),
           "num_classes": len(source.class_ids), "global_batch_size": 2}
    ordered = _batches(source.train, **mix)
    for skip in (0, 0, 0, 5):   # the parallel order varies from run to run
        loose = _batches(source.train, deterministic=False, skip_steps=skip, **mix)
        assert len(loose) == len(ordered) - skip
        for (x, y), (x_ordered, y_ordered) in zip(loose, ordered[skip:], strict=True):
            np.testing.assert_array_equal(x, x_ordered)
            np.testing.assert_array_equal(y, y_ordered)


def test_shards_hold_the_pixels_and_labels_of_the_files(tree, out):
    """Same pixels for evaluation (and so the same validation loss and accuracy); training
    visits the same examples in another order (shards have no file list to permute)."""
    def evaluated(split):
        ds = ds_lib.build_eval_dataset(split, global_batch_size=4, image_size=32)
        return sorted((hashlib.sha1(x.tobytes()).hexdigest(), int(y))
                      for xs, ys in ds.as_numpy_iterator() for x, y in zip(xs, ys, strict=True))

    files, shards = sources.load_source("imagenet", tree["root"]), sources.load_source(
        "shards", out)
    assert evaluated(shards.val) == evaluated(files.val)
    kept = [(p, y) for p, y in tree["train"].items() if p not in (tree["cmyk"], tree["png"])]
    file_split = sources.Split(files=np.array([p for p, _ in kept], object),
                               labels=np.array([y for _, y in kept], np.int64))
    names = {os.path.relpath(p, tree["image_root"]) for p, _ in kept}
    records = [(n, y, r) for n, y, r in _records(out, "train") if n in names]
    record_split = sources.Split(
        files=None, labels=None, num_examples=len(records),
        records=lambda: tf.data.Dataset.from_tensor_slices(
            ([r for _, _, r in records], [y for _, y, _ in records])))
    assert evaluated(record_split) == evaluated(file_split)


def test_prepare_and_train_through_a_non_local_filesystem(tree):
    path = "ram://prepare_test/shards"
    prepare.prepare(tree["root"], path, shard_mb=SHARD_MB, workers=1)  # ram:// is per process
    assert tf.io.gfile.exists(f"{path}/dataset_info.json")
    source = sources.load_source("shards", path)
    assert source.train.num_examples == 20 and source.train.shards.paths[0].startswith("ram://")
    batches = list(ds_lib.build_train_dataset(source.train, global_batch_size=4, image_size=32,
                                              seed=0))
    assert len(batches) == 5 and batches[0][0].shape == (4, 32, 32, 3)
    assert len(list(ds_lib.build_eval_dataset(source.val, global_batch_size=4,
                                              image_size=32))) == 2


@pytest.mark.slow
def test_training_run_killed_mid_epoch_resumes_exactly(out, tmp_path_factory):
    from tests import test_resume as resume

    reference = str(tmp_path_factory.mktemp("shards_uninterrupted"))
    resume.run_to_end(resume.flags(out, reference, dataset="shards"))
    run_dir = str(tmp_path_factory.mktemp("shards_killed"))
    args = resume.flags(out, run_dir, dataset="shards")
    resume.start_and_kill_at(args, 13)      # mid-epoch 2 (10 steps an epoch at batch 2)
    assert 13 <= resume.latest_step(run_dir) < 20
    resume.run_to_end(args)
    resume.assert_same_run(run_dir, reference)
