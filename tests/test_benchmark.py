"""keras_resnet.benchmark: a tiny run prints the comparison table and parseable last lines.

No timing is asserted (the numbers depend on the machine and its load), only the format and that
every rate is positive.
"""

import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUMBER = r"([0-9]+(?:\.[0-9]+)?)"


def run_benchmark(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "keras_resnet.benchmark", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.mark.slow
def test_tiny_benchmark_prints_table_ratio_and_images_per_sec():
    done = run_benchmark("--depth=18", "--image_size=32", "--batch_size=2", "--warmup_steps=1",
                         "--steps=2", "--precision=auto,float32", "--noisolate", "--torch=none")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()

    last = re.fullmatch(rf"images/s: {NUMBER}", lines[-1])
    assert last, lines[-1]
    assert float(last.group(1)) > 0
    ratio = re.fullmatch(rf"ratio: {NUMBER}", lines[-2])
    assert ratio and float(ratio.group(1)) > 0, lines[-2]

    header = next(i for i, line in enumerate(lines) if line.startswith("model "))
    rows = lines[header + 1:-2]
    assert [row.split()[0] for row in rows] == ["resnet18", "resnet18",
                                                "keras.applications.ResNet50"]
    assert rows[0].split()[1].startswith("auto=")  # the resolved default policy is shown
    assert rows[2].split()[1] == "float32"
    for row in rows:
        images_per_sec = float(row.split()[4])
        assert images_per_sec > 0, row
    assert rows[2].split()[8] == "1.00x"  # the baseline against itself


@pytest.mark.slow
def test_torch_row_trains_the_same_network_and_prints_the_ratio():
    pytest.importorskip("torch")
    done = run_benchmark("--depth=18", "--image_size=32", "--batch_size=2", "--warmup_steps=1",
                         "--steps=2", "--precision=float32", "--nobaseline",
                         "--torch=bf16_channels_last")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("model "))
    rows = lines[header + 1:header + 3]
    assert [" ".join(row.split()[:2]) for row in rows] == ["resnet18 float32",
                                                           "torch resnet18"], rows
    assert float(rows[1].split()[5]) > 0  # images/s of the torch row
    assert re.search(rf"resnet18 float32 vs torch resnet18 bf16_channels_last: {NUMBER}x",
                     done.stdout)
    device = next(line for line in lines if line.startswith("Device: "))
    assert "logical CPUs; flags:" in device


def test_torch_network_has_torchvisions_parameter_count():
    """torchvision's resnet18 has 11,689,512 parameters and resnet50 25,557,032 (1000 classes)."""
    pytest.importorskip("torch")
    from keras_resnet.model.torch_resnet import build_torch_resnet

    for depth, count in ((18, 11_689_512), (50, 25_557_032)):
        assert sum(p.numel() for p in build_torch_resnet(depth).parameters()) == count


def test_bad_setting_is_a_one_line_usage_error():
    done = run_benchmark("--precision=float64", timeout=120)
    assert done.returncode != 0
    assert "--precision='float64'; valid: auto, float32" in done.stderr


@pytest.mark.slow
def test_input_pipeline_benchmark_on_generated_jpegs(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "pipelines.benchmark", *args],
                              capture_output=True, text=True, timeout=300, cwd=REPO)

    done = run(f"--data_dir={tmp_path / 'jpegs'}", "--fake_images=24", "--batch_size=8",
               "--image_size=32", "--passes=2")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("24 images, batch 8, size 32"), lines
    rates = [float(m.group(1)) for line in lines
             for m in [re.search(rf"{NUMBER} images/s", line)] if m]
    assert len(rates) == 2 and all(r > 0 for r in rates), lines  # decode only, keras
    last = re.fullmatch(rf"images/s: {NUMBER}", lines[-1])
    assert last and float(last.group(1)) > 0, lines[-1]
    assert re.search(r"train pipeline: [0-9.]+x decode only, [0-9.]+x keras", done.stdout)

    missing = run(f"--data_dir={tmp_path / 'nothing'}")
    assert missing.returncode == 2 and "--fake_images=2000" in missing.stderr
