"""Fine-tuning: --init_from, frozen parts with BatchNorm in inference mode, the head's learning
rate, and exact resume of a fine-tuning run (which ignores --init_from)."""

import os
import signal

import keras
import numpy as np
import pytest

from keras_resnet.model import torch_format
from keras_resnet.model.resnet import build_resnet
from keras_resnet.training import finetune
from keras_resnet.training.config import Config
from tests import torch_reference as ref
from tests.kaggle_tree import make_kaggle_tree
from tests.test_resume import (
    args_value,
    final_weights,
    flags,
    latest_step,
    run_to_end,
    start_and_kill_at,
)


def _model(num_classes=3):
    return build_resnet(18, num_classes=num_classes, input_shape=(32, 32, 3),
                        include_preprocessing=True)


def _batch(seed=0, n=4, num_classes=3):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, 32, 32, 3)).astype(np.uint8),
            rng.integers(0, num_classes, n))


def test_frozen_parts_keep_weights_and_batchnorm_statistics():
    model = _model()
    finetune.freeze(model, Config(trainable_from="stage4").frozen_groups)
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9), "sparse_categorical_crossentropy")
    frozen = {w.path: w.numpy().copy() for layer in model.layers
              if finetune.layer_group(layer.name) in ("stem", "stage1", "stage2", "stage3")
              for w in layer.weights}
    trained = {w.path: w.numpy().copy() for w in model.get_layer("stage4_block1_bn1").weights}
    x, y = _batch()
    # Frozen BatchNorm normalises with its moving statistics even in a training call.
    bn_in = keras.Model(model.inputs, model.get_layer("stage1_block1_conv1").output)(x)
    bn = model.get_layer("stage1_block1_bn1")
    np.testing.assert_allclose(bn(bn_in, training=True), bn(bn_in, training=False), atol=1e-5)
    model.fit(x, y, epochs=2, verbose=0)
    assert len(frozen) > 50
    for path, value in frozen.items():
        np.testing.assert_array_equal(_var(model, path), value, err_msg=path)
    changed = [p for p, v in trained.items() if not np.array_equal(_var(model, p), v)]
    assert len(changed) == 4  # gamma, beta and both moving statistics of a trained BatchNorm


def _var(model, path):
    return next(w.numpy() for w in model.weights if w.path == path)


def test_head_learning_rate_multiplier():
    """First SGD step: delta = -lr * grad, so the head's step is exactly `multiplier` times."""
    deltas = {}
    for multiplier in (1.0, 10.0):
        keras.utils.set_random_seed(0)
        model = _model()
        model.compile(finetune.HeadScaledSGD(0.01, momentum=0.9, head_lr_multiplier=multiplier),
                      "sparse_categorical_crossentropy")
        before = [w.numpy().copy() for w in model.trainable_weights]
        model.train_on_batch(*_batch())
        deltas[multiplier] = {w.path: w.numpy() - b
                              for w, b in zip(model.trainable_weights, before, strict=True)}
    for path, delta in deltas[1.0].items():
        scale = 10.0 if path.startswith("predictions/") else 1.0
        np.testing.assert_allclose(deltas[10.0][path], scale * delta, rtol=1e-4, atol=1e-7,
                                   err_msg=path)


def test_init_from_replaces_classifier_of_other_class_count(tmp_path):
    sd = ref.random_state_dict(18, 10, seed=1)
    path = tmp_path / "r18.pth"
    path.write_bytes(torch_format.torch_file_bytes(sd))
    model = _model(num_classes=3)
    message = finetune.init_from(model, str(path), num_classes=3)
    assert "10 classes" in message and "newly initialised" in message
    np.testing.assert_array_equal(model.get_layer("bn1").moving_mean.numpy(),
                                  sd["bn1.running_mean"])
    wrong_depth = build_resnet(34, num_classes=3, input_shape=(32, 32, 3))
    with pytest.raises(ValueError, match="--depth=34 but the file holds depth=18. Pass the "
                       "file's: --depth=18.$"):
        finetune.init_from(wrong_depth, str(path), num_classes=3)


def test_init_from_a_detection_backbone_names_its_prefix(tmp_path):
    sd = ref.random_state_dict(18, 10, seed=4)
    backbone = {f"backbone.body.{k}": v for k, v in sd.items() if not k.startswith("fc.")}
    path = tmp_path / "maskrcnn.pth"
    path.write_bytes(torch_format.torch_file_bytes({"model": backbone, "epoch": 26}))
    model = _model(num_classes=3)
    message = finetune.init_from(model, str(path), num_classes=3)
    assert message == (f"Initialised from {path} (the ResNet under 'backbone.body.'); it has "
                       "no classifier, so the classifier is newly initialised.")
    np.testing.assert_array_equal(model.get_layer("conv1").kernel.numpy(),
                                  sd["conv1.weight"].transpose(2, 3, 1, 0))


def test_init_from_a_file_that_records_another_variant_is_refused(monkeypatch):
    """A .keras file or run folder says v1 or v1.5; loading a v1 ResNet-50 into the default v1.5
    model fit every shape and gave other outputs, silently. Files that record no variant (torch
    ones) load as before."""
    from keras_resnet.model import weights

    sd = ref.random_state_dict(50, 3, seed=2)
    model = build_resnet(50, num_classes=3, input_shape=(32, 32, 3), variant="v1.5")
    recorded = {}
    monkeypatch.setattr(weights, "read_state_dict", lambda path: (sd, recorded))
    recorded["variant"] = "v1"
    with pytest.raises(weights.WeightsError, match=r"^r50\.keras holds a v1 ResNet-50 \(stride on "
                       r"the first 1x1 conv\) but this run builds v1\.5: pass --variant=v1\.$"):
        finetune.init_from(model, "r50.keras", num_classes=3, variant="v1.5")
    recorded["variant"] = "v1.5"
    assert "all weights" in finetune.init_from(model, "r50.keras", num_classes=3, variant="v1.5")
    recorded.clear()  # a torchvision file: no variant to check
    assert "all weights" in finetune.init_from(model, "r50.pth", num_classes=3, variant="v1.5")


@pytest.mark.parametrize("values, message", [
    (dict(freeze=("stem", "stage9")), "unknown stage9"),
    (dict(trainable_from="stem"), "--trainable_from='stem'"),
    (dict(freeze=("stem",), trainable_from="stage2"), "not both"),
    (dict(freeze=("stem", "stage1", "stage2", "stage3", "stage4", "head")), "nothing would train"),
    (dict(head_lr_multiplier=0.0), "--head_lr_multiplier=0.0"),
    (dict(init_from="/nonexistent/w.pth"), "no such file"),
])
def test_bad_finetuning_flags(values, message):
    with pytest.raises(ValueError, match=message):
        Config(**values).validate()


@pytest.fixture(scope="module")
def finetune_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    make_kaggle_tree(root / "data", num_classes=3, train_per_class=4, val_per_class=2,
                     image_size=40)
    sd = ref.random_state_dict(18, 10, seed=2)
    (root / "r18.pth").write_bytes(torch_format.torch_file_bytes({"state_dict": sd}))
    extra = dict(init_from=str(root / "r18.pth"), trainable_from="stage3", head_lr_multiplier=5)
    reference = str(root / "uninterrupted")
    result = run_to_end(flags(str(root / "data"), reference, **extra))
    # Once, in the log (it was printed as well).
    assert (result.stdout + result.stderr).count("the classifier is newly initialised") == 1
    return str(root / "data"), extra, sd, reference


@pytest.mark.slow  # training runs in subprocesses
def test_finetuning_run_starts_from_file_and_freezes(finetune_setup):
    _, _, sd, reference = finetune_setup
    weights = final_weights(reference)
    # The stem's kernel is the only (7, 7, 3, 64) tensor (frozen: no optimizer slot for it).
    stem = [v for v in weights.values() if v.shape == (7, 7, 3, 64)]
    assert len(stem) == 1
    # The stem was frozen: after two epochs it still holds the file's weights.
    np.testing.assert_array_equal(stem[0], sd["conv1.weight"].transpose(2, 3, 1, 0))
    # Its BatchNorm ran in inference mode: the file's running statistics are unchanged.
    means = [v for v in weights.values() if v.shape == (64,)
             and np.array_equal(v, sd["bn1.running_mean"])]
    assert len(means) == 1


@pytest.mark.slow  # training runs in subprocesses
def test_finetuning_run_resumes_exactly_and_ignores_init_from(finetune_setup, tmp_path):
    data_dir, extra, _, reference = finetune_setup
    args = flags(data_dir, str(tmp_path), **extra)
    code, _ = start_and_kill_at(args, step=3)
    assert code == -signal.SIGKILL and latest_step(str(tmp_path)) >= 3
    resumed = run_to_end(args)
    output = resumed.stdout + resumed.stderr
    assert "--init_from=" in output and "is ignored" in output
    a, b = final_weights(str(tmp_path)), final_weights(reference)
    assert a.keys() == b.keys() and len(a) > 100
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert os.path.basename(args_value(args, "model_dir")) == "run"


# ----------------------------------------------------------------- does fine-tuning pay off?

def _image_folder(root, labels, train_per_class, val_per_class, size, seed):
    """An ImageFolder tree (train/<class>/, val/<class>/) of demo classes `labels`."""
    from PIL import Image

    from pipelines.demo import draw_example

    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for label in labels:
            directory = root / split / f"class{label}"
            directory.mkdir(parents=True)
            for i in range(count):
                image, _ = draw_example(rng, label, size)
                Image.fromarray(image).save(directory / f"{i}.jpg", quality=90)
    return str(root)


FT_EPOCHS = 5
FT_TARGET = 0.4  # val top-1 on 5 classes (chance 0.2); measured: fine-tuned 0.45 at epoch 2, scratch 0.33 at epoch 5


@pytest.mark.slow
def test_finetuning_from_other_classes_reaches_target_sooner(tmp_path):
    """Pretrain on demo classes 5-9, then train on classes 0-4 from scratch and from those
    weights with the same recipe: the fine-tuned run reaches FT_TARGET val top-1 in fewer epochs."""
    import csv

    other = _image_folder(tmp_path / "other", range(5, 10), 100, 20, 32, seed=1)
    target = _image_folder(tmp_path / "target", range(5), 60, 30, 32, seed=2)
    common = dict(dataset="imagenet", depth=18, image_size=32, batch_size=32, export="false",
                  verbose="2", mixed_precision="float32", base_learning_rate=0.2,
                  warmup_epochs=1, label_smoothing=0.0, checkpoint_every_steps=0, seed=0)

    def train(name, data_dir, epochs, **extra):
        values = dict(common, data_dir=data_dir, epochs=epochs,
                      model_dir=str(tmp_path / name), **extra)
        run_to_end([f"--{k}={v}" for k, v in values.items()])
        with open(tmp_path / name / "history.csv") as f:
            return [float(row["val_top1"]) for row in csv.DictReader(f)]

    pretrain = train("pretrain", other, 8)
    scratch = train("scratch", target, FT_EPOCHS)
    tuned = train("finetune", target, FT_EPOCHS, init_from=str(tmp_path / "pretrain"))
    print(f"\npretrain (classes 5-9) val top-1 by epoch: {pretrain}\n"
          f"scratch  (classes 0-4): {scratch}\nfinetune (classes 0-4): {tuned}")

    def first_epoch(history):
        return next((e + 1 for e, top1 in enumerate(history) if top1 >= FT_TARGET), None)

    assert first_epoch(tuned) is not None, tuned
    assert first_epoch(scratch) is None or first_epoch(tuned) < first_epoch(scratch)
