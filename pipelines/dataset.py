"""tf.data pipelines for training and evaluation: order, shard, skip, decode, batch, prefetch.

A split is any object with `files` (paths), `labels` (int), `records` (callable or None) and
`num_examples`, such as `pipelines.sources.Split`. Elements are `(uint8 [B, S, S, 3], int64 [B])`.

Training order is reproducible from (seed, epoch) alone: epoch e visits the examples in a
permutation drawn from (seed, e), and example number p of that epoch is augmented with a seed
drawn from (seed, e, p). Skipping (resume) and sharding (multi-worker) therefore act on integer
positions before any file is read, and a resumed run sees the same pixels as an uninterrupted one.
"""

import functools
import hashlib
import math
import os

import numpy as np
import tensorflow as tf

from pipelines import augment as augment_lib
from pipelines import preprocessing

AUTOTUNE = tf.data.AUTOTUNE
# Each epoch's position list is cut into this many chunks so a data service can hand them out to
# its workers dynamically; each chunk recomputes the epoch's permutation (17 ms for 1.28M files).
CHUNKS_PER_EPOCH = 64
# Stream salts so the order and the augmentation of an epoch use independent random numbers.
_ORDER_SALT, _AUGMENT_SALT, _MIX_SALT = 0, 1, 2
# cache= on a file split holds every encoded file in memory; beyond this, use TFRecords instead.
CACHE_MAX_BYTES = 1 << 30
# Shuffle buffer for splits given as records (TFDS), which have no file list to permute.
RECORDS_SHUFFLE_BUFFER = 10_000
# Stand-ins tried for a file that fails to decode: the files after it in the index (the first
# that decodes takes its position; see load_batch). Tried one at a time and only after a
# failure, so a run of bad files in one class folder costs nothing until it happens.
SUBSTITUTES = 16
# Prepared shards (pipelines.prepare): an input pipeline reads SHARD_CYCLE shards at a time,
# round robin, and permutes each window of SHUFFLE_WINDOW consecutive records (see _shard_plan).
SHARD_CYCLE = 16
SHUFFLE_WINDOW = 1024
SHARD_READ_BUFFER = 1 << 20   # bytes of read-ahead per open shard (large for remote storage)
_WINDOW_SALT = 2


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
    """Training steps per epoch; the last partial batch is dropped."""
    if global_batch_size <= 0:
        raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
    return num_examples // global_batch_size


def _options(deterministic: bool, sharded: bool) -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = deterministic
    # Several parallel map calls already use every core; intra-op threads would only contend.
    options.threading.max_intra_op_parallelism = 1
    if sharded:  # the pipeline shards itself; auto-sharding would fall back to DATA (decode all)
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return options


def _pipeline_layout(global_batch_size, input_context):
    """(input pipeline id, number of pipelines, batch size of this pipeline's elements)."""
    if input_context is None:
        return 0, 1, global_batch_size
    return (input_context.input_pipeline_id, input_context.num_input_pipelines,
            input_context.get_per_replica_batch_size(global_batch_size))


def has_files(split) -> bool:
    return split.files is not None and len(split.files) > 0


def encoded_bytes_estimate(split, sample: int = 1000) -> int:
    """About how many bytes the split's files hold (sizes of an even sample of them x count)."""
    if not has_files(split):
        return 0
    files = np.asarray(split.files)
    picked = files[np.linspace(0, len(files) - 1, min(sample, len(files))).astype(int)]
    return int(np.mean([os.path.getsize(f) for f in picked]) * len(files))


def split_fingerprint(split, *extra, where=True) -> str:
    """A short hash of the split's files and labels (and `extra`): names cache files, so a cache
    written for another file list, labelling or image size is never read back. `where=False`
    hashes each file by its folder and name only, so the same dataset moved elsewhere (another
    --data_dir) gives the same hash."""
    digest = hashlib.sha256(repr(extra).encode())
    if has_files(split):
        names = (map(str, split.files) if where else
                 (os.path.join(*str(f).replace("\\", "/").split("/")[-2:]) for f in split.files))
        digest.update("\n".join(names).encode())
        digest.update(np.asarray(split.labels, np.int64).tobytes())
    elif getattr(split, "shards", None) is not None:
        paths = split.shards.paths if where else map(os.path.basename, split.shards.paths)
        digest.update("\n".join(paths).encode() + repr(split.shards.lengths).encode())
    else:
        digest.update(f"records:{split.num_examples}".encode())
    return digest.hexdigest()[:12]


def _cached_bytes(files: np.ndarray, cache: str) -> tf.Tensor:
    """Every file's bytes in one string tensor (read once; `cache` may name a tf.data cache file)."""
    total = sum(os.path.getsize(f) for f in files)
    if total > CACHE_MAX_BYTES:
        raise ValueError(f"cache={cache!r} needs {total / 2**30:.1f} GiB of encoded images in "
                         f"memory (limit {CACHE_MAX_BYTES / 2**30:.0f} GiB): use cache=None")
    ds = tf.data.Dataset.from_tensor_slices(files).map(tf.io.read_file, num_parallel_calls=AUTOTUNE)
    ds = ds.cache("" if cache == "memory" else cache)
    # One batch one larger than the split: the cache reads to its end, which is when tf.data
    # finalizes a cache file (a batch of exactly len(files) would leave it unfinished).
    return ds.batch(len(files) + 1).get_single_element()


def _example_seed(seed, epoch, position, salt=_AUGMENT_SALT) -> tf.Tensor:
    base = tf.constant([seed, salt], tf.int64)
    return tf.random.experimental.stateless_fold_in(
        tf.random.experimental.stateless_fold_in(base, epoch), position)


def _file_positions(num_examples, examples_per_epoch, seed, start_epoch, num_epochs, skip,
                    pipeline_id, num_pipelines, repeats=1):
    """Dataset of (epoch, position in epoch, file index) int64 triples, in training order.

    repeats=R (repeated augmentation, torchvision's RASampler): position p reads the file at
    permutation index p // R, so each file drawn in an epoch comes R times in a row, at R
    consecutive positions that go to different input pipelines (p % num_pipelines) when there
    are at least R of them, and get different augmentation seeds; the epoch length is unchanged
    (it covers 1/R of the files). Mixing keeps the copies apart (mix_shift).
    """
    chunk = max(1, math.ceil(examples_per_epoch / CHUNKS_PER_EPOCH))
    chunks = math.ceil(examples_per_epoch / chunk)

    def chunk_positions(g):
        epoch = start_epoch + g // chunks
        lo = (g % chunks) * chunk
        pos = tf.range(lo, tf.minimum(lo + chunk, examples_per_epoch), dtype=tf.int64)
        keep = tf.equal(pos % num_pipelines, pipeline_id)
        keep &= (g >= chunks) | (pos >= skip)  # resume: skip happens on positions, not pixels
        pos = tf.boolean_mask(pos, keep)
        order_seed = tf.random.experimental.stateless_fold_in(
            tf.constant([seed, _ORDER_SALT], tf.int64), epoch)
        perm = tf.random.experimental.stateless_shuffle(
            tf.range(num_examples, dtype=tf.int64), seed=order_seed)
        return tf.data.Dataset.from_tensor_slices(
            (tf.fill(tf.shape(pos), epoch), pos, tf.gather(perm, pos // repeats)))

    # A range source lets a tf.data service split the work by chunk (dynamic sharding).
    return tf.data.Dataset.range(skip // chunk, num_epochs * chunks).flat_map(chunk_positions)


def mix_shift(repeats: int, num_pipelines: int, batch_size: int) -> int:
    """How far mixup/cutmix rolls a pipeline's batch to find each image's partner.

    Without repeated augmentation 1, torchvision's roll. With repeats=R the R copies of an image
    are R consecutive positions of the epoch; a pipeline keeps every num_pipelines-th one, so its
    copies are ceil(R / num_pipelines) consecutive places of its own stream, and rolling by that
    many pairs each image with another image (the copies of one image never mix with each other,
    which would leave their label one-hot). A batch may start in the middle of a group of copies;
    the partners are still in another group. A batch shorter than twice that shift cannot keep
    the wrapped-round partners apart; it rolls by half its size, the partner as far away as the
    batch allows (some images may then mix with a copy of themselves).
    """
    shift = -(-repeats // num_pipelines)  # ceil
    if batch_size < 2 * shift:
        shift = max(1, batch_size // 2)
    return shift


def _record_positions(records, examples_per_epoch, seed, start_epoch, num_epochs, skip,
                      pipeline_id, num_pipelines):
    """Dataset of (epoch, position, image_bytes, label) for splits without files (TFDS)."""

    def epoch_records(epoch):  # a Python int: the shuffle seed must be a Python value
        order_seed = int(np.random.SeedSequence([seed, _ORDER_SALT, epoch]).generate_state(1)[0])
        ds = records().shuffle(RECORDS_SHUFFLE_BUFFER, seed=order_seed)
        ds = ds.take(examples_per_epoch).enumerate()
        first = skip if epoch == start_epoch else 0
        ds = ds.filter(lambda pos, _: (pos >= first) & tf.equal(pos % num_pipelines, pipeline_id))
        return ds.map(lambda pos, record: (tf.constant(epoch, tf.int64), pos) + tuple(record))

    epochs = [epoch_records(e) for e in range(start_epoch, start_epoch + num_epochs)]
    return functools.reduce(lambda a, b: a.concatenate(b), epochs)


def round_robin_state(lengths, consumed: int):
    """After `consumed` records of a round-robin interleave (one record per shard in turn, an
    exhausted shard left out) of shards with `lengths`: (records read from each shard, index of
    the shard read next). Lets a resumed epoch reopen the shards at those records."""
    lengths = np.asarray(lengths, np.int64)
    lo, hi = 0, int(lengths.max(initial=0))
    while lo < hi:   # the most whole rounds r with sum(min(length, r)) <= consumed
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if np.minimum(lengths, mid).sum() <= consumed else (lo, mid - 1)
    offsets = np.minimum(lengths, lo)
    rest = consumed - int(offsets.sum())
    alive = np.flatnonzero(lengths > lo)
    offsets[alive[:rest]] += 1
    return offsets, (int(alive[rest]) if rest < len(alive) else 0)


def _reads_own_shards(lengths, num_pipelines: int, quota: int) -> bool:
    """Whether every input pipeline's share of whole shards (the smallest it can draw) holds
    its `quota` records of an epoch; else pipelines read all shards and keep every n-th record."""
    share = len(lengths) // num_pipelines
    return num_pipelines == 1 or (share > 0 and int(np.sort(lengths)[:share].sum()) >= quota)


def _shard_plan(lengths, seed, epochs, pipeline_id, num_pipelines, own_shards, skip_records):
    """Per epoch: the groups of shards this pipeline reads and the records to skip in each.

    Epoch e reads the shards in a permutation drawn from (seed, e) (each pipeline the shards
    p, p + n, p + 2n, ... of it when `own_shards`), SHARD_CYCLE at a time, round robin.
    `skip_records`: records of the first epoch's stream already trained on; groups before them
    are dropped and the group holding them reopens each shard at its record (round_robin_state)
    and rotates the round to the shard read next, so the stream continues where it stopped.
    Returns (shard index [E, G, C] with -1 padding, records to skip [E, G, C]).
    """
    plans = []
    for i, epoch in enumerate(epochs):
        order_seed = tf.random.experimental.stateless_fold_in(
            tf.constant([seed, _ORDER_SALT], tf.int64), epoch)
        order = tf.random.experimental.stateless_shuffle(
            tf.range(len(lengths), dtype=tf.int64), seed=order_seed).numpy()
        mine = order[pipeline_id::num_pipelines] if own_shards else order
        groups, consumed = [], skip_records if i == 0 else 0
        for g in range(0, len(mine), SHARD_CYCLE):
            shards = mine[g:g + SHARD_CYCLE]
            size = int(lengths[shards].sum())
            if consumed >= size:
                consumed -= size
                continue
            offsets, first = round_robin_state(lengths[shards], consumed)
            consumed = 0
            turn = np.roll(np.arange(len(shards)), -first)
            groups.append((shards[turn], offsets[turn]))
        plans.append(groups)
    width = max(len(p) for p in plans)
    index = np.full((len(plans), width, SHARD_CYCLE), -1, np.int64)
    skips = np.zeros_like(index)
    for e, groups in enumerate(plans):
        for g, (shards, offsets) in enumerate(groups):
            index[e, g, :len(shards)], skips[e, g, :len(shards)] = shards, offsets
    return index, skips


def _shard_positions(shards, examples_per_epoch, seed, start_epoch, num_epochs, skip,
                     pipeline_id, num_pipelines):
    """Dataset of (epoch, position, image_bytes, label) read shard by shard (prepared shards).

    The record at each position is a pure function of (seed, epoch, number of input pipelines):
    shard order and round robin (_shard_plan), then each window of SHUFFLE_WINDOW records of the
    pipeline's stream is permuted with a seed from (seed, epoch, window). Resume skips whole
    shards, then records inside the few open ones, without decoding any image.
    With several input pipelines each reads its own shards (positions p * n + id) when the
    shards divide well enough, else all shards keeping records p % n == id (as file lists do).
    """
    lengths = np.asarray(shards.lengths, np.int64)
    own = _reads_own_shards(lengths, num_pipelines, examples_per_epoch // num_pipelines)
    count = examples_per_epoch // num_pipelines if own else examples_per_epoch
    first_skip = skip // num_pipelines if own else skip
    window_start = first_skip // SHUFFLE_WINDOW * SHUFFLE_WINDOW
    epochs = list(range(start_epoch, start_epoch + num_epochs))
    index, skips = _shard_plan(lengths, seed, epochs, pipeline_id, num_pipelines, own,
                               window_start)
    paths = tf.constant(list(shards.paths))

    def read(shard, offset):
        return tf.data.TFRecordDataset(paths[shard], buffer_size=SHARD_READ_BUFFER).skip(offset)

    def group_stream(shard_ids, offsets):
        keep = shard_ids >= 0
        return tf.data.Dataset.from_tensor_slices(
            (tf.boolean_mask(shard_ids, keep), tf.boolean_mask(offsets, keep))).interleave(
            read, cycle_length=SHARD_CYCLE, block_length=1, num_parallel_calls=AUTOTUNE,
            deterministic=True)   # the order is part of the positions, whatever the options say

    def epoch_stream(e):
        epoch = tf.constant(start_epoch, tf.int64) + e
        start = tf.where(e == 0, tf.constant(window_start, tf.int64), 0)
        skip_to = tf.where(e == 0, tf.constant(first_skip, tf.int64), 0)
        ds = tf.data.Dataset.from_tensor_slices((tf.gather(index, e), tf.gather(skips, e)))
        ds = ds.flat_map(group_stream).take(count - start)
        ds = ds.map(shards.parse, num_parallel_calls=AUTOTUNE, deterministic=True)
        ds = ds.batch(SHUFFLE_WINDOW).enumerate(start // SHUFFLE_WINDOW).map(
            lambda w, window: _permute_window(window, seed, epoch, w))
        ds = ds.unbatch().enumerate(start).filter(lambda q, _: q >= skip_to)
        if not own:
            ds = ds.filter(lambda q, _: tf.equal(q % num_pipelines, pipeline_id))
        position = (lambda q: q * num_pipelines + pipeline_id) if own else (lambda q: q)
        return ds.map(lambda q, record: (epoch, position(q)) + tuple(record))

    return tf.data.Dataset.range(num_epochs).flat_map(epoch_stream)


def _permute_window(window, seed, epoch, w):
    image_bytes, labels = window
    window_seed = tf.random.experimental.stateless_fold_in(tf.random.experimental.stateless_fold_in(
        tf.constant([seed, _WINDOW_SALT], tf.int64), epoch), w)
    order = tf.random.experimental.stateless_shuffle(
        tf.range(tf.shape(labels, out_type=tf.int64)[0]), seed=window_seed)
    return tf.gather(image_bytes, order), tf.gather(labels, order)


def build_train_dataset(split, *, global_batch_size: int, image_size: int, seed: int,
                        start_epoch: int = 0, num_epochs: int = 1, skip_steps: int = 0,
                        input_context=None, deterministic: bool = False, cache=None,
                        data_service=None, max_steps_per_epoch=None,
                        crop_area_range=preprocessing.CROP_AREA_RANGE,
                        crop_aspect_range=preprocessing.CROP_ASPECT_RANGE,
                        augment=None, mix=None, num_classes=None,
                        repeated_aug: int = 1) -> tf.data.Dataset:
    """Augmented training batches for epochs [start_epoch, start_epoch + num_epochs).

    Each epoch has exactly steps_per_epoch(num_examples, global_batch_size) global batches, none
    straddling two epochs. skip_steps global batches of the first epoch are dropped on positions
    (no file is read); skip_steps >= steps_per_epoch rolls over into later epochs.
    input_context: each input pipeline keeps positions p % num_input_pipelines == its id and
    batches the per-replica batch size, so each image is decoded by one worker only.
    deterministic=False allows nondeterministic ops and tf.data's unordered defaults; the
    batches are still those of deterministic=True, pixel for pixel, for file and records splits
    alike: every stage that decides which example goes into which batch runs in order (measured
    no slower), so a resume, which skips batches by count, trains exactly the examples not yet
    trained.
    cache: None, "memory" or a file path. For file splits, the encoded files are read once into
    memory (crops stay random each epoch); limited to CACHE_MAX_BYTES.
    data_service: "grpc://host:port" of a tf.data service dispatcher, or None. Decoding moves to
    the service with processing_mode="distributed_epoch": the chunked position source is split
    dynamically across service workers, so every example is decoded once per epoch (with
    "parallel_epochs" each service worker would emit the whole epoch again). Batches are formed on
    the client; order is then non-deterministic, the pixels of each example are not.
    A file that cannot be read or decoded is logged and its position filled by a stand-in (the
    next file of the index that decodes, SUBSTITUTES tried, with that position's seed), so later
    batches, and a resume, are as without the failure. A
    record (TFDS, shards) that fails is dropped and the stream topped up from the epoch after the
    last one: the number of batches stays exact, later batches shift by one example.
    max_steps_per_epoch: shorter epochs (each still a fresh permutation of the whole split), so a
    capped run's epochs and data epochs stay aligned.
    crop_area_range, crop_aspect_range: RandomResizedCrop's scale and ratio.
    augment: an augment.ImageAugment (TrivialAugmentWide / RandAugment, random erasing) applied
    after crop and flip, seeded per example like the crop.
    mix: an augment.BatchMix; each pipeline's batch is mixed with a seed drawn from (seed, epoch,
    position of its first example), and labels become float32 [B, num_classes] soft labels.
    Each image's partner is the one before it in the batch, or mix_shift(repeated_aug, ...)
    places before it with repeated augmentation, so that it is not a copy of the same image.
    repeated_aug: R >= 1, each file drawn in an epoch is seen R times (RASampler); files only.
    """
    steps = steps_per_epoch(split.num_examples, global_batch_size)
    if max_steps_per_epoch:
        steps = min(steps, max_steps_per_epoch)
    if steps == 0:
        raise ValueError(f"{split.num_examples} examples do not fill one batch of "
                         f"global_batch_size={global_batch_size}")
    if num_epochs < 1 or start_epoch < 0 or skip_steps < 0:
        raise ValueError(f"need num_epochs >= 1, start_epoch >= 0, skip_steps >= 0; got "
                         f"num_epochs={num_epochs}, start_epoch={start_epoch}, "
                         f"skip_steps={skip_steps}")
    start_epoch += skip_steps // steps
    num_epochs -= skip_steps // steps
    skip_steps %= steps
    if num_epochs < 1:
        raise ValueError(f"skip_steps leaves no epoch to train: {num_epochs} left")
    pipeline_id, num_pipelines, batch_size = _pipeline_layout(global_batch_size, input_context)
    if data_service:  # the service spreads examples over consumers; no static shard
        pipeline_id, num_pipelines = 0, 1
    if global_batch_size % num_pipelines:
        raise ValueError(f"global_batch_size={global_batch_size} is not divisible by "
                         f"{num_pipelines} input pipelines")
    examples_per_epoch = steps * global_batch_size
    skip = skip_steps * global_batch_size
    total = (num_epochs * examples_per_epoch - skip) // num_pipelines

    if repeated_aug > 1 and not has_files(split):
        raise ValueError("repeated_aug needs a file split (records splits have no permutation)")
    augment = augment if augment is not None and augment.active else None
    mix = mix if mix is not None and mix.active else None
    if mix is not None and not num_classes:
        raise ValueError("mix needs num_classes (the width of the soft labels)")
    crop = dict(area_range=tuple(crop_area_range), aspect_range=tuple(crop_aspect_range))
    # Repeated augmentation puts an image's copies side by side: mix each with another image.
    # The tf.data service interleaves its workers' streams in the order they finish, so no fixed
    # shift skips the copies there: torchvision's roll by one (its workers' streams alternate).
    shift = 1 if data_service else mix_shift(repeated_aug, num_pipelines, batch_size)

    def train_image(raw, epoch, pos):
        example_seed = _example_seed(seed, epoch, pos)
        image = preprocessing.preprocess_for_train(raw, image_size, example_seed, **crop)
        if augment is not None:  # an independent stream: the crop's draws stay as without it
            image = augment_lib.augment_image(
                image, tf.random.experimental.stateless_fold_in(example_seed, 1), augment)
        return image

    def mix_batch(images, labels, epochs, positions):
        # The seed is the batch's first example's in (epoch, position) order, whatever the
        # order within the batch (the data service's); a batch may span two epochs after a
        # dropped record.
        first = tf.argmin(tf.cast(epochs, tf.int64) * examples_per_epoch
                          + tf.cast(positions, tf.int64))
        batch_seed = _example_seed(seed, epochs[first], positions[first], _MIX_SALT)
        return augment_lib.mix_batch(images, labels, batch_seed, mix, num_classes, shift)

    from_files, image_bytes = has_files(split), None
    if from_files:
        files = tf.constant(np.asarray(split.files, dtype=str))
        image_bytes = _cached_bytes(np.asarray(split.files, dtype=str), cache) if cache else None
        labels = tf.constant(np.asarray(split.labels, dtype=np.int64))
    elif split.records is None and getattr(split, "shards", None) is None:
        raise ValueError("split has neither files nor records")
    elif data_service:
        raise ValueError("data_service needs a file split; records splits are read locally")
    shards = getattr(split, "shards", None)

    def keep(image, label, epoch, pos):  # mixing needs each batch's position for its seed
        return (image, label, epoch, pos) if mix is not None else (image, label)

    def load(epoch, pos, idx):
        raw = tf.io.read_file(files[idx]) if image_bytes is None else image_bytes[idx]
        return keep(train_image(raw, epoch, pos), labels[idx], epoch, pos)

    def load_batch(epochs, positions, idxs):
        # One batch's positions ("slots"). A slot whose file fails to decode (it passed the
        # start-up check) is filled by a stand-in: its own file shifted by 1 (then 2, ...) in
        # the index, the first that decodes, with the slot's epoch and position (its seed), at
        # the slot's index in the batch. Every batch keeps its positions, so the batches after
        # it, and a resume that skips whole batches, stay as uninterrupted. Each slot's file is
        # decoded once; stand-ins are read only for the slots that failed, one at a time.
        n = tf.size(positions)
        slots = tf.range(n)

        def decoded(slot, shift):
            idx = (tf.gather(idxs, slot) + tf.cast(shift, idxs.dtype)) % split.num_examples
            return slot, load(tf.gather(epochs, slot), tf.gather(positions, slot), idx)

        # In slot order whatever `deterministic` says (measured: no slower), so a batch short of
        # a dropped slot is topped up from the next one's first slots, and mixing pairs the same.
        own = (tf.data.Dataset.from_tensor_slices(slots)
               .map(lambda slot: decoded(slot, 0), num_parallel_calls=AUTOTUNE,
                    deterministic=True)
               .ignore_errors(log_warning=True))
        # The batch's decoded slots as one element (an empty one when every slot failed).
        none = tf.nest.map_structure(lambda spec: tf.zeros([0, *spec.shape], spec.dtype),
                                     own.element_spec)
        decoded_slots = own.batch(tf.cast(n, tf.int64)).concatenate(
            tf.data.Dataset.from_tensors(none)).take(1)

        blank = tf.nest.map_structure(lambda spec: tf.zeros(spec.shape, spec.dtype),
                                      own.element_spec[1])

        def stand_in(slot):
            # The slot's shifted files, in turn, until one decodes; a blank (dropped below) when
            # none does, so each failed slot has one element and the next one's stays its own.
            found = (tf.data.Dataset.range(1, 1 + SUBSTITUTES)
                     .map(lambda shift: (True, decoded(slot, shift)[1]))
                     .ignore_errors(log_warning=True))
            return found.concatenate(tf.data.Dataset.from_tensors((False, blank))).take(1)

        def complete(got, examples):
            failed = tf.logical_not(tf.reduce_any(slots[:, None] == got[None, :], axis=1))

            def mended():  # each failed slot's stand-in at the slot's index
                stand_ins = tf.data.Dataset.from_tensor_slices(
                    tf.boolean_mask(slots, failed)).flat_map(stand_in)
                decoded_ones = tf.data.Dataset.from_tensor_slices(examples).map(
                    lambda *example: (True, example))
                return tf.data.Dataset.choose_from_datasets(
                    [decoded_ones, stand_ins],
                    tf.data.Dataset.from_tensor_slices(tf.cast(failed, tf.int64))).filter(
                    lambda found, example: found).map(lambda found, example: example)

            return tf.cond(tf.reduce_any(failed), mended,
                           lambda: tf.data.Dataset.from_tensor_slices(examples))

        return decoded_slots.flat_map(complete)

    def load_record(epoch, pos, raw, label):
        return keep(train_image(raw, epoch, pos), tf.cast(label, tf.int64), epoch, pos)

    def examples(first_epoch, epochs, skip_positions, job_suffix):
        if from_files:
            ds = _file_positions(split.num_examples, examples_per_epoch, seed, first_epoch,
                                 epochs, skip_positions, pipeline_id, num_pipelines, repeated_aug)
            # Positions per pipeline come in batch-sized groups, aligned with the batches.
            # The groups stay in order whatever `deterministic` says (two are read at once),
            # so each batch holds its own positions, in slot order (load_batch).
            ds = ds.batch(batch_size).interleave(
                load_batch, cycle_length=2, block_length=batch_size, num_parallel_calls=2,
                deterministic=True)
        elif shards is not None:   # read sequentially; --cache would hold the whole run's stream
            ds = _shard_positions(shards, examples_per_epoch, seed, first_epoch, epochs,
                                  skip_positions, pipeline_id, num_pipelines)
            # In order whatever `deterministic` says (measured no slower): unordered, an example
            # could move to the next batch, and a resume would train it twice or not at all.
            ds = ds.map(load_record, num_parallel_calls=AUTOTUNE, deterministic=True)
        else:
            ds = _record_positions(split.records, examples_per_epoch, seed, first_epoch, epochs,
                                   skip_positions, pipeline_id, num_pipelines)
            if cache:
                ds = ds.cache("" if cache == "memory" else cache)
            ds = ds.map(load_record, num_parallel_calls=AUTOTUNE, deterministic=True)  # as above
        # A record that fails to decode (and, for files, SUBSTITUTES more after it) must not stop
        # training: it is dropped and the count topped up below.
        ds = ds.ignore_errors(log_warning=True)
        if data_service:
            ds = ds.apply(tf.data.experimental.service.distribute(
                processing_mode=tf.data.experimental.service.ShardingPolicy.DYNAMIC,
                service=data_service,
                job_name=f"train_s{seed}_e{first_epoch}_k{skip_positions}{job_suffix}"))
        return ds

    ds = examples(start_epoch, num_epochs, skip, "")
    # Spare examples (read only if some were dropped) keep the count exact.
    ds = ds.concatenate(examples(start_epoch + num_epochs, 1, 0, "_spare")).take(total)
    ds = ds.batch(batch_size, drop_remainder=True)
    if mix is not None:
        # In order whatever `deterministic` says: batches must not swap (a resume skips them by
        # count).
        ds = ds.map(mix_batch, num_parallel_calls=AUTOTUNE, deterministic=True)
    ds = ds.prefetch(AUTOTUNE)
    # A records split keeps tf.data's order everywhere, inside TFDS's reader too (its parsing
    # map follows this option): positions are counted on the records' order.
    return ds.with_options(_options(deterministic or not from_files,
                                    sharded=input_context is not None))


def eval_steps(num_examples: int, global_batch_size: int) -> int:
    """Global steps of an evaluation pass (the last one partial)."""
    return math.ceil(num_examples / global_batch_size)


def build_eval_dataset(split, *, global_batch_size: int, image_size: int, input_context=None,
                       cache=None, resize_size: int = 0) -> tf.data.Dataset:
    """Resized, center-cropped batches in file order; the last partial batch is kept.

    With input_context, pipeline i evaluates examples i, i + n, i + 2n, ... (n pipelines).
    With several replicas in sync, elements are (images, labels, weights): every pipeline is
    padded with weight-0 blank images to ceil(num_examples / global_batch_size) full steps, so no
    replica gets an empty batch (oneDNN's convolution breaks on one) and every worker runs the
    same number of steps; weighted metrics stay exact.
    cache: None, "memory" or a file path; caches the preprocessed uint8 images, so later
    evaluations skip decoding. An unreadable file is logged and left out.
    resize_size: shorter side before the center crop (0: image_size * 256/224).
    """
    pipeline_id, num_pipelines, batch_size = _pipeline_layout(global_batch_size, input_context)
    if has_files(split):
        ds = tf.data.Dataset.from_tensor_slices(
            (np.asarray(split.files, dtype=str), np.asarray(split.labels, dtype=np.int64)))
        ds = ds.shard(num_pipelines, pipeline_id).map(lambda f, y: (tf.io.read_file(f), y))
    elif split.records is not None:
        ds = split.records().shard(num_pipelines, pipeline_id)
    else:
        raise ValueError("split has neither files nor records")
    ds = ds.map(lambda raw, y: (preprocessing.preprocess_for_eval(raw, image_size,
                                                                  resize_size=resize_size),
                                tf.cast(y, tf.int64)), num_parallel_calls=AUTOTUNE)
    ds = ds.ignore_errors(log_warning=True)
    if cache:
        ds = ds.cache("" if cache == "memory" else cache)
    if input_context is not None and input_context.num_replicas_in_sync > 1:
        steps = eval_steps(split.num_examples, global_batch_size)
        blank = (tf.zeros([image_size, image_size, 3], tf.uint8), tf.constant(0, tf.int64),
                 tf.constant(0.0))
        ds = ds.map(lambda x, y: (x, y, tf.constant(1.0)))
        ds = ds.concatenate(tf.data.Dataset.from_tensors(blank).repeat())
        ds = ds.take(steps * global_batch_size // num_pipelines)
        ds = ds.batch(batch_size, drop_remainder=True)
    else:
        ds = ds.batch(batch_size)
    ds = ds.prefetch(AUTOTUNE)
    return ds.with_options(_options(True, sharded=input_context is not None))


def synthetic_dataset(*, batch_size: int, image_size: int, num_classes: int,
                      seed: int = 0) -> tf.data.Dataset:
    """One random batch repeated forever: measures the model without any input cost."""
    images = tf.random.stateless_uniform(
        [batch_size, image_size, image_size, 3], [seed, 0], 0, 256, dtype=tf.int32)
    labels = tf.random.stateless_uniform(
        [batch_size], [seed, 1], 0, num_classes, dtype=tf.int64)
    return tf.data.Dataset.from_tensors((tf.cast(images, tf.uint8), labels)).repeat()
