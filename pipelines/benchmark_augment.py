"""Benchmark of the training input pipeline with torchvision's V2 augmentation (not a test).

    python -m pipelines.benchmark_augment --data_dir=/tmp/bench --fake_images=1000 \
        [--torch_python=/path/to/venv/bin/python]

On the same JPEG files and cores, prints images/s of:
  today      our pipeline as in the V1 recipe: RandomResizedCrop(224) + flip
  v2         our pipeline with the V2 recipe: RandomResizedCrop(176) + flip + TrivialAugmentWide
             + RandomErasing(0.1) + mixup 0.2 / cutmix 1.0 per batch + repeated augmentation 4
  torchvision (with --torch_python: a Python with torch and torchvision) the same V2 transforms
             (references/classification/presets.py) in a DataLoader with one worker per CPU,
             MixUp/CutMix in the collate function, as torchvision's train.py does
and the ratios. The issue's target is v2 >= 1.5x torchvision.
"""

import argparse
import json
import os
import subprocess

from pipelines import augment, dataset
from pipelines import benchmark as base

TORCH_SCRIPT = r"""
import json, os, sys, time, statistics
import torch, torchvision
from torch.utils.data import DataLoader, default_collate
from torchvision import datasets, transforms
from torchvision.transforms import v2

data_dir, batch, size, passes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(1)
t = transforms.Compose([
    transforms.RandomResizedCrop(size, interpolation=transforms.InterpolationMode.BILINEAR,
                                 antialias=True),
    transforms.RandomHorizontalFlip(0.5),
    transforms.TrivialAugmentWide(interpolation=transforms.InterpolationMode.BILINEAR),
    transforms.PILToTensor(),
    transforms.ConvertImageDtype(torch.float),
    transforms.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    transforms.RandomErasing(p=0.1),
])
ds = datasets.ImageFolder(data_dir, t)
mix = v2.RandomChoice([v2.MixUp(alpha=0.2, num_classes=len(ds.classes)),
                       v2.CutMix(alpha=1.0, num_classes=len(ds.classes))])
loader = DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True,
                    num_workers=os.cpu_count(), persistent_workers=True,
                    collate_fn=lambda b: mix(*default_collate(b)))
def window():
    start, n = time.perf_counter(), 0
    for images, _ in loader:
        n += images.shape[0]
    return n / (time.perf_counter() - start)
window()
print(json.dumps({"rate": statistics.median(window() for _ in range(passes)),
                  "torch": torch.__version__, "torchvision": torchvision.__version__}))
"""


def v2_dataset(split, batch_size, epochs):
    """Our pipeline with the V2 recipe's train-time augmentation."""
    return dataset.build_train_dataset(
        split, global_batch_size=batch_size, image_size=176, seed=0, num_epochs=epochs,
        augment=augment.ImageAugment(auto_augment="ta_wide", random_erase=0.1),
        mix=augment.BatchMix(mixup_alpha=0.2, cutmix_alpha=1.0), num_classes=base.FAKE_CLASSES,
        repeated_aug=4)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--fake_images", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--torch_python", default="",
                        help="a Python with torch + torchvision for the DataLoader comparison")
    args = parser.parse_args(argv)
    if args.fake_images and not (os.path.isdir(args.data_dir) and os.listdir(args.data_dir)):
        base.write_fake_images(args.data_dir, args.fake_images)
    split = base.image_folder(args.data_dir)
    batches = split.num_examples // args.batch_size
    print(f"{split.num_examples} JPEGs, batch {args.batch_size}, {os.cpu_count()} CPUs",
          flush=True)
    today = dataset.build_train_dataset(split, global_batch_size=args.batch_size, image_size=224,
                                        seed=0, num_epochs=args.passes + 1)
    rates = {"today (crop 224 + flip)": base.images_per_second(today, batches, args.passes)}
    print(f"today (crop 224 + flip): {rates['today (crop 224 + flip)']:.0f} images/s", flush=True)
    v2 = v2_dataset(split, args.batch_size, args.passes + 1)
    rates["v2"] = base.images_per_second(v2, batches, args.passes)
    print(f"v2 (crop 176 + flip + TA-wide + erasing + mixup/cutmix + RA x4): "
          f"{rates['v2']:.0f} images/s, {rates['v2'] / rates['today (crop 224 + flip)']:.2f}x "
          "today", flush=True)
    if args.torch_python:
        out = subprocess.run([args.torch_python, "-c", TORCH_SCRIPT, args.data_dir,
                              str(args.batch_size), "176", str(args.passes)],
                             capture_output=True, text=True, timeout=3600)
        if out.returncode:
            print(f"torchvision: failed ({out.stderr.strip().splitlines()[-1:]})")
        else:
            result = json.loads(out.stdout.strip().splitlines()[-1])
            rates["torchvision"] = result["rate"]
            print(f"torchvision {result['torchvision']} (torch {result['torch']}) DataLoader, "
                  f"{os.cpu_count()} workers, same V2 transforms: {result['rate']:.0f} images/s",
                  flush=True)
            print(f"v2 / torchvision: {rates['v2'] / result['rate']:.2f}x (target >= 1.5x)")
    else:
        print("torchvision: not measured (no --torch_python)")
    return rates


if __name__ == "__main__":
    main()
