"""Benchmark: the training input pipeline from prepared shards against loose files.

    python -m pipelines.shard_benchmark [--images=2048] [--startup_files=1281167] [--work_dir=/tmp]

1. Throughput: `--images` ImageNet-sized fake JPEGs (pipelines.benchmark.write_fake_images) in an
   ImageFolder tree, prepared as shards; images/s of `build_train_dataset` from the files and from
   the shards, same images, same cores, warm page cache (a pass read first) and cold (the page
   cache dropped through /proc/sys/vm/drop_caches before the pass, when this process may).
2. Start-up at full ImageNet size: a Kaggle tree of `--startup_files` train files (1000 class
   folders) plus 50,000 flat val files, all hardlinks of a few small JPEGs, and its shards (about
   1024 train shards); seconds from a fresh process's start to the first batch of the training
   pipeline, for the files with no index cached, with the index cached, and for the shards.
Everything is written under a temporary folder in `--work_dir` and removed at the end.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

LINKS_PER_FILE = 60_000   # ext4 allows 65,000 hard links to one file
STARTUP_SCRIPT = r"""
import sys, time
start = float(sys.argv[1])
from pipelines import dataset, sources
source = sources.load_source(sys.argv[2], sys.argv[3])
ds = dataset.build_train_dataset(source.train, global_batch_size=256, image_size=224, seed=0)
next(iter(ds))
print(f"{time.time() - start:.2f}")
"""


def drop_page_cache() -> bool:
    """Empties the page cache (needs root and a writable /proc/sys); False when not allowed."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def throughput(split, batch_size, image_size, passes, cold):
    """Median images/s over `passes` passes (each a whole epoch from a fresh iterator for cold,
    else epochs read from one iterator after a warm-up epoch)."""
    import statistics

    from pipelines import benchmark, dataset

    steps = dataset.steps_per_epoch(split.num_examples, batch_size)
    if not cold:
        ds = dataset.build_train_dataset(split, global_batch_size=batch_size,
                                         image_size=image_size, seed=0, num_epochs=passes + 1)
        return benchmark.images_per_second(ds, steps, passes)
    rates = []
    for p in range(passes):
        if not drop_page_cache():
            return None
        ds = dataset.build_train_dataset(split, global_batch_size=batch_size,
                                         image_size=image_size, seed=p)
        start, n = time.perf_counter(), 0
        for images, _ in ds:
            n += int(images.shape[0])
        rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates)


def make_startup_tree(root, train_files, val_files, seed_images):
    """A Kaggle-layout tree of hardlinks to `seed_images` (1000 classes)."""
    from pipelines.layout import KAGGLE_IMAGE_ROOT, SYNSET_MAPPING, VAL_SOLUTION

    image_root = os.path.join(root, KAGGLE_IMAGE_ROOT)
    os.makedirs(root, exist_ok=True)
    wnids = [f"n{1440764 + i:08d}" for i in range(1000)]
    wnids[0] = "n01440764"
    with open(os.path.join(root, SYNSET_MAPPING), "w") as f:
        f.writelines(f"{w} class {i}\n" for i, w in enumerate(wnids))
    per_class = [train_files // 1000 + (i < train_files % 1000) for i in range(1000)]
    k = 0
    for wnid, count in zip(wnids, per_class, strict=True):
        folder = os.path.join(image_root, "train", wnid)
        os.makedirs(folder)
        for n in range(count):
            os.link(seed_images[k % len(seed_images)], os.path.join(folder, f"{wnid}_{n}.JPEG"))
            k += 1
    os.makedirs(os.path.join(image_root, "val"))
    rows = []
    for n in range(val_files):
        name = f"ILSVRC2012_val_{n + 1:08d}"
        os.link(seed_images[n % len(seed_images)], os.path.join(image_root, "val", name + ".JPEG"))
        rows.append(f"{name},{wnids[n % 1000]} 1 1 2 2\n")
    with open(os.path.join(root, VAL_SOLUTION), "w") as f:
        f.write("ImageId,PredictionString\n")
        f.writelines(rows)


def small_jpegs(folder, count=8, size=(80, 60)):
    """`count` small noisy JPEGs (a few KiB each): the start-up tree measures listing, not bytes."""
    import numpy as np
    from PIL import Image

    os.makedirs(folder)
    rng, paths = np.random.default_rng(0), []
    for i in range(count):
        paths.append(os.path.join(folder, f"seed_{i}.JPEG"))
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
            paths[-1], quality=90)
    return paths


def startup_seconds(dataset_name, data_dir):
    """Seconds from a new Python process's start to the first batch of the train pipeline."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-c", STARTUP_SCRIPT, repr(time.time()), dataset_name,
                          data_dir], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--startup_files", type=int, default=1_281_167,
                        help="train files of the start-up tree (0: skip that part)")
    parser.add_argument("--work_dir", default=tempfile.gettempdir())
    parser.add_argument("--skip_throughput", action="store_true")
    args = parser.parse_args(argv)

    from pipelines import benchmark, prepare, sources

    work = tempfile.mkdtemp(prefix="shard_benchmark-", dir=args.work_dir)
    rows = []
    try:
        tree = os.path.join(work, "images")
        benchmark.write_fake_images(os.path.join(tree, "train"), args.images)
        mib = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tree)
                  for f in fs) / 2**20
        shards_dir = os.path.join(work, "images_shards")
        prepare.prepare(tree, shards_dir, shard_mb=max(1.0, mib / 32))
        files = sources.load_source("imagenet", tree)
        shards = sources.load_source("shards", shards_dir)
        print(f"{args.images} images ({mib:.0f} MiB), {len(shards.train.shards.paths)} shards, "
              f"batch {args.batch_size}, size {args.image_size}, {os.cpu_count()} CPUs",
              flush=True)
        for cache in () if args.skip_throughput else ("warm", "cold"):
            for name, source in (("files", files), ("shards", shards)):
                rate = throughput(source.train, args.batch_size, args.image_size, args.passes,
                                  cold=cache == "cold")
                rows.append((f"train pipeline images/s, {cache} page cache", name,
                             "not measured (drop_caches not permitted)" if rate is None
                             else f"{rate:.0f}"))
                print(" | ".join(rows[-1]), flush=True)
        if args.startup_files:
            big = os.path.join(work, "startup")
            # Small files (1.28M x 110 KiB would not fit), at most LINKS_PER_FILE links to each.
            seeds = small_jpegs(os.path.join(work, "seeds"),
                                count=-(-args.startup_files * 2 // LINKS_PER_FILE) + 1)
            start = time.perf_counter()
            make_startup_tree(big, args.startup_files, args.startup_files * 50_000 // 1_281_167,
                              seeds)
            print(f"hardlink tree: {time.perf_counter() - start:.0f} s", flush=True)
            start = time.perf_counter()
            seed_mib = sum(os.path.getsize(s) for s in seeds) / len(seeds) / 2**20
            prepare.prepare(big, os.path.join(work, "startup_shards"),
                            shard_mb=seed_mib * args.startup_files / 1024, verify=False)
            print(f"prepare of the start-up tree: {time.perf_counter() - start:.0f} s",
                  flush=True)
            os.remove(os.path.join(big, sources.INDEX_FILE))   # the prepare built it
            for label, dataset_name, path in (
                    ("files, no index cached", "imagenet", big),
                    ("files, index cached", "imagenet", big),
                    ("shards", "shards", os.path.join(work, "startup_shards"))):
                seconds = startup_seconds(dataset_name, path)
                rows.append((f"start to first batch, {args.startup_files:,} train files",
                             label, f"{seconds:.1f} s"))
                print(" | ".join(rows[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n| measure | input | result |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return rows


if __name__ == "__main__":
    main()
