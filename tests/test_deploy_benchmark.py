"""`python -m keras_resnet.deploy_benchmark`: every format measured at the sizes it is served at."""

import os

import pytest

from keras_resnet import deploy_benchmark
from keras_resnet.model.resnet import build_resnet
from keras_resnet.serving import deploy
from pipelines.demo import make_demo
from tests.fixres_run import write_fixres_run

CLASS_IDS = ["n0", "n1", "n2"]


@pytest.fixture(scope="module")
def fixres_run(tmp_path_factory):
    """A FixRes run (any input size; evaluated with a 40 crop of a 52 shorter side) and a
    three-class demo dataset."""
    root = tmp_path_factory.mktemp("deploy_benchmark")
    run = root / "run"
    write_fixres_run(run, CLASS_IDS, CLASS_IDS)
    data = make_demo(str(root / "data"), num_classes=3, train_per_class=2, val_per_class=3)
    return run, data


def test_formats_are_exported_and_measured_at_the_runs_eval_sizes(fixres_run, tmp_path, capsys):
    run, data = fixres_run
    work = tmp_path / "work"
    assert deploy_benchmark.run([f"--model_dir={run}", "--dataset=demo", f"--data_dir={data}",
                                 "--formats=keras,onnx", "--latency_runs=2",
                                 "--throughput_batches=1", "--batch_size=4",
                                 f"--work_dir={work}"]) == 0
    out = capsys.readouterr().out
    assert "9 validation images of demo, shorter side 52, center crop 40 px" in out
    rows = {line.split("|")[1].strip(): line.split("|")[7].strip()
            for line in out.splitlines() if line.startswith("| ") and "---" not in line}
    assert set(rows) == {"format", "keras", "onnx"}
    assert rows["onnx"] == rows["keras"]  # same top-1 as the Keras model on the same pixels
    # The file a client would deploy says how to crop for it: the run's sizes, not 256/224.
    side = deploy.read_sidecar(str(work / "onnx.onnx"))
    assert (side["image_size"], side["resize_size"]) == (40, 52), side
    assert side["class_ids"] == CLASS_IDS


def test_a_model_of_any_size_without_a_run_config_asks_for_the_size(fixres_run, tmp_path, capsys):
    run, data = fixres_run
    lone = tmp_path / "lone.keras"
    os.link(run / "best.keras", lone)  # no config.json beside it: no eval size to read
    assert deploy_benchmark.run([f"--model={lone}", "--dataset=demo", f"--data_dir={data}",
                                 "--formats=keras"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"error: {lone} takes images of any size; pass --image_size."


def test_a_fixed_size_model_refuses_another_image_size(fixres_run, tmp_path, capsys):
    _, data = fixres_run
    path = tmp_path / "fixed.keras"
    build_resnet(18, num_classes=3, input_shape=(32, 32, 3), include_preprocessing=True).save(path)
    assert deploy_benchmark.run([f"--model={path}", "--dataset=demo", f"--data_dir={data}",
                                 "--formats=keras", "--image_size=40"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"error: {path} takes 32 px images; --image_size=40 does not fit."
