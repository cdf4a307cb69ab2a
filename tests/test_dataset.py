"""pipelines.dataset: epoch structure, order and augmentation seeds, resume, sharding, bad files.

Each test file's label is its own index, so labels identify which file an element came from.
"""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from pipelines import dataset

NUM_FILES = 22  # with batch 4: 5 steps per epoch, 2 files left out of each epoch
BATCH = 4
SIZE = 24


@dataclasses.dataclass(frozen=True)
class FakeSplit:  # the fields of pipelines.sources.Split that pipelines.dataset reads
    files: np.ndarray
    labels: np.ndarray
    records: object = None
    num_examples: int = 0


def _write(path, index, fmt="JPEG", mode="RGB"):
    rng = np.random.default_rng(index)
    h, w = (40, 48) if index % 2 else (48, 36)
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 5 + index * 7, y * 5, np.full_like(x, index * 11)], -1) % 256
    rgb = np.clip(rgb + rng.normal(0, 8, rgb.shape), 0, 255).astype(np.uint8)
    Image.fromarray(rgb).convert(mode).save(path, fmt)


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    files = []
    for i in range(NUM_FILES):
        path = str(root / f"img_{i:03d}.JPEG")
        # One PNG and one CMYK JPEG named .JPEG, as ImageNet has.
        _write(path, i, fmt="PNG" if i == 3 else "JPEG", mode="CMYK" if i == 5 else "RGB")
        files.append(path)
    return FakeSplit(np.array(files), np.arange(NUM_FILES, dtype=np.int64), None, NUM_FILES)


def _train(split, **kwargs):
    kwargs = {"global_batch_size": BATCH, "image_size": SIZE, "seed": 1, "deterministic": True,
              **kwargs}
    return [(x.numpy(), y.numpy()) for x, y in dataset.build_train_dataset(split, **kwargs)]


def _labels(batches):
    return np.concatenate([y for _, y in batches])


def _pixels(batches):
    return np.concatenate([x for x, _ in batches])


def test_steps_per_epoch_drops_the_remainder():
    assert dataset.steps_per_epoch(22, 4) == 5
    assert dataset.steps_per_epoch(3, 4) == 0
    with pytest.raises(ValueError, match="global_batch_size must be positive, got 0"):
        dataset.steps_per_epoch(10, 0)


def test_train_yields_exact_epochs_of_distinct_files(split):
    batches = _train(split, num_epochs=3)
    assert len(batches) == 3 * 5
    for x, y in batches:
        assert x.shape == (BATCH, SIZE, SIZE, 3) and x.dtype == np.uint8 and y.dtype == np.int64
    epochs = _labels(batches).reshape(3, 20)
    for epoch in epochs:  # each epoch visits 20 distinct files, none twice
        assert len(set(epoch)) == 20
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled every epoch
    # Epoch 1 of a run is epoch 1 of any run with the same seed.
    np.testing.assert_array_equal(_labels(_train(split, start_epoch=1)), epochs[1])


def test_same_seed_same_batches_different_seed_different(split):
    a, b = _train(split, num_epochs=1), _train(split, num_epochs=1)
    np.testing.assert_array_equal(_labels(a), _labels(b))
    np.testing.assert_array_equal(_pixels(a), _pixels(b))
    c = _train(split, num_epochs=1, seed=2)
    assert not np.array_equal(_labels(a), _labels(c))


def test_augmentation_changes_between_epochs(split):
    batches = _train(split, num_epochs=2)
    labels, pixels = _labels(batches), _pixels(batches)
    first = {label: pixels[i] for i, label in enumerate(labels[:20])}
    later = {label: pixels[20 + i] for i, label in enumerate(labels[20:])}
    common = set(first) & set(later)
    assert sum(not np.array_equal(first[k], later[k]) for k in common) > len(common) // 2


@pytest.mark.parametrize("skip_steps", [2, 7])
def test_resume_equals_the_tail_of_an_uninterrupted_run(split, skip_steps):
    full = _train(split, num_epochs=2)
    resumed = _train(split, num_epochs=2, skip_steps=skip_steps)
    assert len(resumed) == 10 - skip_steps
    np.testing.assert_array_equal(_labels(resumed), _labels(full[skip_steps:]))
    np.testing.assert_array_equal(_pixels(resumed), _pixels(full[skip_steps:]))


def test_non_deterministic_order_keeps_each_batchs_examples(split):
    """deterministic=False may reorder examples within a batch, never move one to another."""
    ordered = _train(split, num_epochs=2)
    loose = _train(split, num_epochs=2, deterministic=False)

    def content(batch):
        x, y = batch
        return sorted((int(label), image.tobytes()) for image, label in zip(x, y, strict=True))

    assert [content(b) for b in loose] == [content(b) for b in ordered]


def test_non_deterministic_order_mixes_as_deterministic(split):
    """A file split is decoded in slot order and its batches come out in order whatever
    `deterministic` says, so mixing pairs the same examples with the same seed: the batches
    equal deterministic ones pixel for pixel."""
    from pipelines import augment

    mix = dict(num_epochs=2, mix=augment.BatchMix(mixup_alpha=0.4, cutmix_alpha=1.0),
               num_classes=NUM_FILES)
    ordered = _train(split, **mix)
    for _ in range(3):  # the parallel order varies from run to run
        loose = _train(split, deterministic=False, **mix)
        for (x, y), (x_ordered, y_ordered) in zip(loose, ordered, strict=True):
            np.testing.assert_array_equal(x, x_ordered)
            np.testing.assert_array_equal(y, y_ordered)


def test_two_input_pipelines_partition_each_epoch(split):
    full = _train(split, num_epochs=2)
    full_by_label = {}
    for i, label in enumerate(_labels(full[:5])):
        full_by_label[label] = _pixels(full[:5])[i]
    shards = []
    for i in range(2):
        ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=i,
                                         num_replicas_in_sync=2)
        batches = _train(split, num_epochs=2, input_context=ctx)
        assert len(batches) == 10 and all(x.shape[0] == BATCH // 2 for x, _ in batches)
        shards.append(batches)
    epoch0 = [set(_labels(s[:5])) for s in shards]
    assert not epoch0[0] & epoch0[1]
    assert epoch0[0] | epoch0[1] == set(_labels(full[:5]))
    # An example gets the same crop whichever pipeline decodes it (seed = epoch and position).
    for shard in shards:
        for i, label in enumerate(_labels(shard[:5])):
            np.testing.assert_array_equal(_pixels(shard[:5])[i], full_by_label[label])


def test_bad_files_keep_the_epoch_length(split, tmp_path):
    files = list(split.files)
    data = open(files[0], "rb").read()
    (tmp_path / "cut.JPEG").write_bytes(data[:200])  # inside the header: undecodable
    (tmp_path / "tail.JPEG").write_bytes(data[: len(data) * 3 // 4])  # missing rows: recovered
    (tmp_path / "junk.JPEG").write_bytes(b"\xff\xd8\xff" + b"\x00" * 50)
    bad = [str(tmp_path / n) for n in ("cut.JPEG", "tail.JPEG", "junk.JPEG")]
    files = np.array(bad + files[3:])
    broken = FakeSplit(files, np.arange(len(files)), None, len(files))
    batches = _train(broken, num_epochs=2)
    assert len(batches) == 2 * 5
    assert all(x.shape == (BATCH, SIZE, SIZE, 3) for x, _ in batches)
    labels = _labels(batches)
    assert 0 not in labels and 2 not in labels  # undecodable files are replaced
    # In place, by the next file of the index: the batches after it are those of a run without
    # the failure, so a resume (which skips positions) continues the same stream exactly.
    for skip_steps in (1, 6):
        resumed = _train(broken, num_epochs=2, skip_steps=skip_steps)
        np.testing.assert_array_equal(_labels(resumed), labels[skip_steps * BATCH:])
        np.testing.assert_array_equal(_pixels(resumed), _pixels(batches[skip_steps:]))


@pytest.mark.parametrize("mix", [False, True])
def test_a_file_that_fails_is_stood_in_for_by_the_next_that_decodes_at_its_position(
        split, tmp_path, mix):
    """The stand-in takes the failed file's position (its crop seed and its index in the batch,
    so mixing pairs it as there): the run equals, batch for batch and pixel for pixel, one whose
    split lists the stand-in's file there. Five failures in a row (a bad folder): each gets the
    next good file."""
    from pipelines import augment

    data = open(split.files[0], "rb").read()
    (tmp_path / "cut.JPEG").write_bytes(data[:200])
    (tmp_path / "junk.JPEG").write_bytes(b"\xff\xd8\xff" + b"\x00" * 50)
    files = list(split.files)
    at = [7, 8, 9, 10, 11]  # not a batch's first position
    bad = [str(tmp_path / ("cut.JPEG" if i % 2 else "junk.JPEG")) for i in at]
    labels = np.arange(len(files))
    broken_files, stood_in = list(files), list(files)
    for i, path in zip(at, bad, strict=True):
        broken_files[i] = path
        stood_in[i] = files[12]
    stood_in_labels = labels.copy()
    stood_in_labels[at] = 12
    options = dict(num_epochs=2, mix=augment.BatchMix(mixup_alpha=0.4, cutmix_alpha=1.0),
                   num_classes=NUM_FILES) if mix else dict(num_epochs=2)
    broken = _train(FakeSplit(np.array(broken_files), labels, None, len(files)), **options)
    expected = _train(FakeSplit(np.array(stood_in), stood_in_labels, None, len(files)),
                      **options)
    assert len(broken) == len(expected) == 10
    for (x, y), (x_expected, y_expected) in zip(broken, expected, strict=True):
        np.testing.assert_array_equal(x, x_expected)
        np.testing.assert_array_equal(y, y_expected)
    if not mix:
        assert not set(_labels(broken)) & set(at)


def test_a_slot_without_a_stand_in_is_dropped_and_the_others_keep_their_places(
        split, tmp_path, monkeypatch):
    """When every substitute of a slot fails too, that slot alone is dropped (the stream is
    topped up from the spare epoch): a later slot's stand-in in the same batch stays at its own
    index, and nothing is read twice or lost."""
    monkeypatch.setattr(dataset, "SUBSTITUTES", 2)
    n = len(split.files)
    order = _labels(_train(split, num_epochs=3))  # two epochs and the spare one
    first = int(order[0])
    bad = {first, (first + 1) % n, (first + 2) % n}  # the first slot has no good substitute
    later = next(int(f) for f in order[1:4] if f not in bad and (f + 1) % n not in bad)
    bad.add(later)
    (tmp_path / "bad.JPEG").write_bytes(b"\xff\xd8\xff" + b"\x00" * 50)
    files = [str(tmp_path / "bad.JPEG") if i in bad else f for i, f in enumerate(split.files)]
    broken = _train(FakeSplit(np.array(files), split.labels, None, n), num_epochs=2)

    def stand_in(f):
        return next((g for g in ((f + s) % n for s in (1, 2)) if g not in bad), None)

    expected = [f if f not in bad else stand_in(f) for f in order.tolist()]
    expected = [f for f in expected if f is not None][:40]
    assert _labels(broken).tolist() == expected
    for _ in range(3):  # unordered decoding tops the short batch up from the same slots
        loose = _train(FakeSplit(np.array(files), split.labels, None, n), num_epochs=2,
                       deterministic=False)
        assert [sorted(y.tolist()) for _, y in loose] == [sorted(y.tolist()) for _, y in broken]


def test_a_transient_read_error_gets_a_stand_in_and_no_file_is_read_twice(split, monkeypatch):
    """A read that fails once (a network file system's hiccup) is stood in for at its position
    like a bad file: the batches do not shift. Each position's file is read once."""
    flaky = split.files[9]
    reads = []

    def read(path):
        path = path.numpy().decode()
        reads.append(path)
        if path == flaky and reads.count(path) == 1:
            raise OSError(f"transient failure reading {path}")
        with open(path, "rb") as f:
            return f.read()

    real_read_file = tf.io.read_file
    monkeypatch.setattr(tf.io, "read_file", lambda path: tf.py_function(read, [path], tf.string))
    batches = _train(split, num_epochs=2)
    monkeypatch.setattr(tf.io, "read_file", real_read_file)
    plain = _train(split, num_epochs=2)
    order = _labels(plain)
    first = int(np.flatnonzero(order == 9)[0])
    expected = order.copy()
    expected[first] = (9 + 1) % NUM_FILES  # the next file of the index, at 9's first position
    np.testing.assert_array_equal(_labels(batches), expected)
    assert len(reads) == len(order) + 1  # every position once, plus the failed read


def test_a_batch_spanning_two_epochs_has_a_mix_seed_of_its_own(split, tmp_path, monkeypatch):
    """A records split tops up a dropped record from the next epoch, so a batch may hold the end
    of one epoch and the start of the next: its mix seed must not repeat the next epoch's."""
    from pipelines import augment

    files = list(split.files)
    (tmp_path / "bad.JPEG").write_bytes(open(files[0], "rb").read()[:200])
    files[5] = str(tmp_path / "bad.JPEG")

    def records():
        return tf.data.Dataset.from_tensor_slices(
            (np.array(files), np.arange(len(files)))).map(lambda f, y: (tf.io.read_file(f), y))

    # Each batch returns its mix seed instead of mixing.
    monkeypatch.setattr(augment, "mix_batch", lambda images, labels, seed, *mix_args: (
        images, tf.tile(seed[None], [tf.shape(labels)[0], 1])))
    ds = dataset.build_train_dataset(
        FakeSplit(None, None, records, len(files)), global_batch_size=BATCH, image_size=SIZE,
        seed=1, deterministic=True, num_epochs=2, mix=augment.BatchMix(mixup_alpha=0.2),
        num_classes=NUM_FILES)
    seeds = [tuple(y[0].numpy()) for _, y in ds]
    assert len(seeds) == 10 and len(set(seeds)) == 10, seeds


def test_cache_gives_the_same_batches(split, tmp_path):
    plain = _train(split, num_epochs=2)
    for cache in ("memory", str(tmp_path / "train_cache")):
        cached = _train(split, num_epochs=2, cache=cache)
        np.testing.assert_array_equal(_pixels(cached), _pixels(plain))
    evals = [dataset.build_eval_dataset(split, global_batch_size=BATCH, image_size=SIZE,
                                        cache=str(tmp_path / "eval_cache")) for _ in range(2)]
    first = [x.numpy() for x, _ in evals[0]]
    assert list(tmp_path.glob("eval_cache*"))
    np.testing.assert_array_equal(np.concatenate(first),
                                  np.concatenate([x.numpy() for x, _ in evals[1]]))


def test_eval_keeps_file_order_and_the_last_partial_batch_or_pads_it_for_replicas(split):
    batches = list(dataset.build_eval_dataset(split, global_batch_size=BATCH, image_size=SIZE))
    assert [int(y.shape[0]) for _, y in batches] == [4] * 5 + [2]
    np.testing.assert_array_equal(np.concatenate([y for _, y in batches]), np.arange(NUM_FILES))
    ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=1,
                                     num_replicas_in_sync=2)
    shard = list(dataset.build_eval_dataset(split, global_batch_size=BATCH, image_size=SIZE,
                                            input_context=ctx))
    # Several replicas: every step full (ceil(22 / 4) = 6 steps of 2 per pipeline), the padding
    # blank and weighted 0, so no replica gets an empty batch and weighted metrics stay exact.
    assert [int(y.shape[0]) for _, y, _ in shard] == [2] * 6
    labels = np.concatenate([y for _, y, _ in shard])
    weights = np.concatenate([w for _, _, w in shard])
    np.testing.assert_array_equal(labels[weights == 1], np.arange(1, 22, 2))
    assert weights.tolist() == [1.0] * 11 + [0.0] and not shard[-1][0][1].numpy().any()


def test_records_split_trains_exact_epochs(split):
    def records():   # in order whatever the options say, as sources' records are
        return tf.data.Dataset.from_tensor_slices(split.files).map(
            lambda f: (tf.io.read_file(f), tf.strings.to_number(
                tf.strings.substr(f, -8, 3), tf.int64)), num_parallel_calls=2, deterministic=True)

    rec = FakeSplit(None, None, records, NUM_FILES)
    batches = _train(rec, num_epochs=2)
    assert len(batches) == 10
    epochs = _labels(batches).reshape(2, 20)
    assert len(set(epochs[0])) == 20 and len(set(epochs[1])) == 20
    np.testing.assert_array_equal(_labels(_train(rec, num_epochs=2, skip_steps=3)),
                                  _labels(batches[3:]))
    # Inside a records source (TFDS's reader) maps follow tf.data's option: it stays ordered.
    options = dataset.build_train_dataset(rec, global_batch_size=BATCH, image_size=SIZE, seed=1,
                                          deterministic=False).options()
    assert options.deterministic is True
    for skip in (0, 0, 0, 3):   # unordered decoding: the same batches, the same resume
        loose = _train(rec, num_epochs=2, skip_steps=skip, deterministic=False)
        np.testing.assert_array_equal(_labels(loose), _labels(batches[skip:]))
        np.testing.assert_array_equal(_pixels(loose), _pixels(batches[skip:]))


def test_bad_arguments_echo_the_value(split):
    with pytest.raises(ValueError, match="22 examples do not fill one batch"):
        dataset.build_train_dataset(split, global_batch_size=64, image_size=SIZE, seed=0)
    with pytest.raises(ValueError, match="cache='memory' needs"):
        old, dataset.CACHE_MAX_BYTES = dataset.CACHE_MAX_BYTES, 10
        try:
            dataset.build_train_dataset(split, global_batch_size=BATCH, image_size=SIZE, seed=0,
                                        cache="memory")
        finally:
            dataset.CACHE_MAX_BYTES = old


def test_synthetic_dataset_shapes():
    x, y = next(iter(dataset.synthetic_dataset(batch_size=2, image_size=SIZE, num_classes=5)))
    assert x.shape == (2, SIZE, SIZE, 3) and x.dtype == tf.uint8
    assert y.dtype == tf.int64 and all(0 <= int(v) < 5 for v in y)



def test_fingerprint_of_a_moved_dataset_is_the_same_without_its_location():
    """A run records its training set by folder and file name (and labels): the same images under
    another --data_dir are the same set, an added or relabelled image is not."""
    from pipelines.sources import Split

    def split(root, names=("a/1.JPEG", "a/2.JPEG", "b/3.JPEG"), labels=(0, 0, 1)):
        return Split(files=np.array([f"{root}/train/{n}" for n in names], dtype=object),
                     labels=np.array(labels, np.int64))

    here, there = split("/data/imagenet"), split("/mnt/disk2/imagenet")
    assert dataset.split_fingerprint(here) != dataset.split_fingerprint(there)  # cache names
    assert (dataset.split_fingerprint(here, where=False)
            == dataset.split_fingerprint(there, where=False))
    for other in (split("/data/imagenet", labels=(0, 1, 1)),
                  split("/data/imagenet", names=("a/1.JPEG", "a/2.JPEG", "b/4.JPEG"))):
        assert (dataset.split_fingerprint(other, where=False)
                != dataset.split_fingerprint(here, where=False))
