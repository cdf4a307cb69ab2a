"""The recipe pieces around the model: EMA (closed form, BatchNorm statistics, checkpoint),
soft-label loss and metrics, BatchNorm weight decay, recipe flags and presets, and exact resume of
a run with every option on."""

import json
import os
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_resnet.training import ema as ema_lib
from keras_resnet.training.config import Config
from keras_resnet.training.optim import SparseCrossentropy, apply_norm_weight_decay, dominant_top_k
from tests import test_resume as resume

REPO = resume.REPO


def tiny_model():
    inputs = keras.Input((4,))
    x = keras.layers.Dense(3, name="dense")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    return keras.Model(inputs, x)


def set_all(model, value):
    for w in model.weights:
        w.assign(np.full(w.shape, value, w.dtype))


@pytest.mark.parametrize("warmup", [True, False])
def test_ema_equals_closed_form_after_k_updates(warmup):
    model = tiny_model()
    set_all(model, 1.0)  # w0 = 1, BatchNorm moving statistics included
    decay = 0.9
    ema = ema_lib.WeightEMA(model, decay, every_steps=1, warmup=warmup)
    set_all(model, 3.0)  # the weights jump to w = 3 and stay there
    k = 7
    for _ in range(k):
        ema.update()
    # ema_k = w + (w0 - w) * prod_{n<k} d_n, d_n = min(decay, (1 + n) / (10 + n)) with warm-up.
    d = [min(decay, (1 + n) / (10 + n)) if warmup else decay for n in range(k)]
    want = 3.0 + (1.0 - 3.0) * np.prod(d)
    names = [w.path for w in model.weights]
    assert any("moving_mean" in n for n in names) and any("moving_variance" in n for n in names)
    for average in ema.averages:
        np.testing.assert_allclose(average.numpy(), want, rtol=1e-6)
    assert int(ema.num_updates.numpy()) == k


def test_ema_update_every_n_steps_swap_and_restore():
    model = tiny_model()
    ema = ema_lib.WeightEMA(model, 0.5, every_steps=3, warmup=False)
    set_all(model, 2.0)
    for step in range(1, 7):
        ema.maybe_update(step)
    assert int(ema.num_updates.numpy()) == 2  # steps 3 and 6
    with ema.swapped():
        swapped = [w.numpy().copy() for w in model.weights]
    for w, s, a in zip(model.weights, swapped, ema.averages, strict=False):
        np.testing.assert_array_equal(s, a.numpy())
        np.testing.assert_array_equal(w.numpy(), 2.0)  # restored


def test_ema_warmup_follows_a_short_run():
    """With the warm-up, after 20 updates the EMA is close to the current weights; without it
    (decay 0.999), it is still the initial weights."""
    for warmup, close in ((True, True), (False, False)):
        model = tiny_model()
        set_all(model, 0.0)
        ema = ema_lib.WeightEMA(model, 0.999, warmup=warmup)
        set_all(model, 1.0)
        for _ in range(20):
            ema.update()
        value = float(ema.averages[0].numpy().flat[0])
        assert (value > 0.6) == close, value


def test_ema_state_round_trips_through_a_checkpoint(tmp_path):
    model = tiny_model()
    ema = ema_lib.WeightEMA(model, 0.9)
    set_all(model, 5.0)
    for _ in range(3):
        ema.update()
    ckpt = tf.train.Checkpoint(model=model, **ema.trackables())
    path = ckpt.save(str(tmp_path / "ckpt"))
    other = tiny_model()
    other_ema = ema_lib.WeightEMA(other, 0.9)
    tf.train.Checkpoint(model=other, **other_ema.trackables()).restore(path).assert_consumed()
    assert int(other_ema.num_updates.numpy()) == 3
    for a, b in zip(ema.averages, other_ema.averages, strict=False):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_soft_label_loss_and_dominant_metrics():
    probs = tf.constant([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    soft = tf.constant([[0.6, 0.4, 0.0], [0.0, 0.3, 0.7]])
    loss = SparseCrossentropy(3, label_smoothing=0.1)
    smoothed = soft.numpy() * 0.9 + 0.1 / 3
    want = np.mean(-np.sum(smoothed * np.log(probs.numpy()), axis=1))
    np.testing.assert_allclose(float(loss(soft, probs)), want, rtol=1e-5)
    hard = tf.constant([0, 2])  # the integer path is unchanged: one-hot of the labels
    np.testing.assert_allclose(float(loss(hard, probs)),
                               float(loss(tf.one_hot(hard, 3), probs)), rtol=1e-6)
    np.testing.assert_array_equal(dominant_top_k(soft, probs, k=1), [1.0, 1.0])
    np.testing.assert_array_equal(dominant_top_k(tf.constant([[0.1, 0.9, 0.0]] * 2), probs, k=1),
                                  [0.0, 0.0])


def test_norm_weight_decay_adds_l2_on_gamma_and_beta():
    model = tiny_model()
    model.get_layer("bn").gamma.assign([1.0, 2.0, 3.0])
    model.get_layer("bn").beta.assign([1.0, 1.0, 1.0])
    assert apply_norm_weight_decay(model, 0.0) == 0 and not model.losses
    assert apply_norm_weight_decay(model, 1e-2) == 2
    # L2 of weight_decay / 2: gradient weight_decay * w, SGD's weight decay.
    np.testing.assert_allclose(float(sum(model.losses)), 0.5e-2 * (1 + 4 + 9 + 3), rtol=1e-6)


@pytest.mark.parametrize("flags, message", [
    (dict(mixup_alpha=-0.1), "--mixup_alpha=-0.1; use >= 0"),
    (dict(cutmix_alpha=-1.0), "--cutmix_alpha=-1.0; use >= 0"),
    (dict(random_erase=1.5), "--random_erase=1.5; use a probability in [0, 1]"),
    (dict(mix_prob=2.0), "--mix_prob=2.0; use a probability in [0, 1]"),
    (dict(repeated_aug=0), "--repeated_aug=0; use an integer >= 1"),
    (dict(eval_image_size=224, eval_resize_size=200), "--eval_resize_size=200 is smaller than"),
    (dict(crop_area_range=("0", "1")), "--crop_area_range=0,1; use 0 < min <= max <= 1"),
    (dict(crop_area_range=("0.5", "1.2")), "--crop_area_range=0.5,1.2"),
    (dict(crop_aspect_range=("2", "1")), "--crop_aspect_range=2,1"),
    (dict(auto_augment="autoaugment"), "--auto_augment='autoaugment'"),
    (dict(ema_decay=1.0), "--ema_decay=1.0"),
    (dict(mixup_alpha=float("inf")), "--mixup_alpha=inf; use a finite number"),  # NaN labels
    (dict(crop_aspect_range=("0.1", "inf")), "--crop_aspect_range=0.1,inf; use a finite number"),
    (dict(label_smoothing=float("nan")), "--label_smoothing=nan; use a finite number"),
    (dict(ra_num_ops=100000), "--ra_num_ops=100000; use 1..16"),  # unrolled in the graph
])
def test_recipe_flags_are_validated(flags, message):
    with pytest.raises(ValueError) as info:
        Config(**flags).validate()
    assert message in str(info.value) and "\n" not in str(info.value)


def test_presets_parse_validate_and_print_one_recipe_block():
    """Each configs/*.flags file: train_main accepts it (with --summary: no data needed), and the
    V2 preset resolves to torchvision's V2 numbers."""
    import train_main

    for name in ("resnet_v1", "resnet_v2", "resnet_short", "small_data"):
        path = os.path.join(REPO, "configs", f"{name}.flags")
        try:
            assert train_main.FLAGS(["train_main.py", f"--flagfile={path}", "--depth=152"]) == [
                "train_main.py"]
            config = train_main.config_from_flags().validate()
        finally:
            train_main.FLAGS.unparse_flags()
        assert config.depth == 152
        if name == "resnet_v2":
            assert config.learning_rate * 1024 / config.batch_size == pytest.approx(0.5)
            assert (config.epochs, config.weight_decay, config.norm_weight_decay) == (600, 2e-5, 0)
            assert (config.mixup_alpha, config.cutmix_alpha, config.random_erase) == (0.2, 1.0, 0.1)
            assert config.auto_augment == "ta_wide" and config.ema and config.repeated_aug == 4
            assert (config.resolved_train_image_size, config.resolved_eval_resize_size,
                    config.resolved_eval_image_size) == (176, 232, 224)
            lines = config.recipe_lines()
            assert any(line.startswith("mixup / cutmix") and "0.2 / 1" in line for line in lines)



def test_recipe_block_names_the_fine_tuning():
    def shown(**values):
        return dict(line.split("  ", 1) for line in Config(**values).recipe_lines())

    assert "fine-tuning" not in shown()
    row = shown(init_from="r50.pth", trainable_from="stage3", head_lr_multiplier=10)["fine-tuning"]
    assert row.strip() == "from r50.pth, frozen stem+stage1+stage2, head learning rate x10"


def test_synthetic_data_says_the_data_flags_are_not_applied():
    lines = Config(dataset="synthetic", mixup_alpha=0.2, auto_augment="ta_wide",
                   repeated_aug=4, random_erase=0.5).recipe_lines()
    shown = {line.split("  ")[0]: line.split("  ", 1)[1].strip() for line in lines}
    for name in ("auto augment", "random erasing", "mixup / cutmix", "repeated augmentation"):
        assert shown[name] == "not applied (--dataset=synthetic)"
    assert shown["train crop"] == "224 px random tensors, no crop"  # the size still applies
    assert shown["label smoothing"] != "not applied (--dataset=synthetic)"  # the loss still is
    on_files = dict(line.split("  ", 1) for line in Config(auto_augment="ta_wide").recipe_lines())
    assert on_files["auto augment"].strip() == "ta_wide"


@pytest.mark.parametrize("name", ["resnet_v2", "resnet_short"])
def test_summary_of_a_fixres_preset_counts_at_the_training_size(name):
    """A FixRes model takes any size; --summary counts it at the training size and says so (it
    raised 'undefined output shape')."""
    import train_main
    from keras_resnet.training import run

    try:
        train_main.FLAGS(["train_main.py", f"--flagfile={REPO}/configs/{name}.flags",
                          "--depth=18"])
        config = train_main.config_from_flags().validate()
    finally:
        train_main.FLAGS.unparse_flags()
    train, evaluate = config.resolved_train_image_size, config.resolved_eval_image_size
    assert train != evaluate
    text = run.summarize(config, num_classes=10)
    assert f"Compute per image at {train}x{train}" in text
    assert f"FixRes: trained at {train}x{train} (the figures above), evaluated and exported at " \
           f"{evaluate}x{evaluate}" in text
    assert "11,181,642" in text  # ResNet-18's trainable parameters with a 10-class head

# ----- exact resume with every option on -----------------------------------------------------

ALL_ON = dict(train_image_size=32, eval_image_size=40, eval_resize_size=44,
              crop_area_range="0.25,1", auto_augment="ta_wide", random_erase=0.5,
              mixup_alpha=0.2, cutmix_alpha=1.0, repeated_aug=2, ema="true", ema_every_steps=2,
              norm_weight_decay=1e-4, export="true")


@pytest.fixture(scope="module")
def all_on_uninterrupted(data_dir, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("all_on"))
    out = resume.run_to_end(recipe_flags(data_dir, run_dir))
    return run_dir, out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from tests.kaggle_tree import make_kaggle_tree

    root = tmp_path_factory.mktemp("imagenet")
    make_kaggle_tree(root, num_classes=3, train_per_class=4, val_per_class=2, image_size=40)
    return str(root)


def recipe_flags(data_dir, run_dir):
    args = resume.flags(data_dir, run_dir, **ALL_ON)
    return args + [f"--export_dir={os.path.join(run_dir, 'export')}"]


@pytest.mark.slow
def test_all_options_sigkill_mid_epoch_resumes_exactly(data_dir, all_on_uninterrupted, tmp_path):
    reference, _ = all_on_uninterrupted
    run_dir = str(tmp_path)
    args = recipe_flags(data_dir, run_dir)
    code, _ = resume.start_and_kill_at(args, step=3)  # epoch 1 of 2, step 3 of 7
    assert code == -signal.SIGKILL
    resumed = resume.run_to_end(args)
    assert "Resuming at epoch" in resumed.stdout
    resume.assert_same_run(run_dir, reference)  # model, optimizer and EMA averages, bit for bit
    ema_names = [n for n in resume.final_weights(run_dir) if n.startswith("ema_averages")]
    assert len(ema_names) > 100


@pytest.mark.slow
def test_all_options_run_reports_ema_and_exports_at_the_eval_size(all_on_uninterrupted):
    run_dir, out = all_on_uninterrupted
    printed = out.stdout + out.stderr  # the recipe block is in the start-up log (stderr)
    assert printed.count("Recipe:") == 1 and "ta_wide" in printed
    results = resume.results(run_dir)
    assert results["ema"] is True
    assert 0 <= results["val_top1"] <= 1 and 0 <= results["val_top1_ema"] <= 1
    best = json.load(open(os.path.join(run_dir, "run", "best.json")))
    assert "val_top1_ema" in best and "val_top1" in best
    loaded = tf.saved_model.load(results["export_dir"])
    assert [int(v.numpy()) for v in loaded.image_size] == [40]  # the eval crop
    assert [int(v.numpy()) for v in loaded.resize_size] == [44]
    image = tf.io.encode_jpeg(tf.zeros([50, 70, 3], tf.uint8))
    out = loaded.signatures["serving_default"](image_bytes=tf.stack([image]))
    assert out["probabilities"].shape == (1, 3)


def test_train_main_rejects_bad_recipe_flags_in_one_line():
    result = subprocess.run([sys.executable, os.path.join(REPO, "train_main.py"),
                             "--repeated_aug=0"], capture_output=True, text=True, timeout=120,
                            cwd=REPO)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "--repeated_aug=0; use an integer >= 1" in result.stderr


def test_show_augment_writes_a_png_grid_with_mixed_labels(data_dir, tmp_path):
    from keras_resnet import show_augment

    out = tmp_path / "grid" / "aug.png"
    code = show_augment.run([f"--flagfile={os.path.join(REPO, 'configs', 'resnet_v2.flags')}",
                             "--dataset=imagenet", f"--data_dir={data_dir}",
                             "--train_image_size=32", "--num_images=4", f"--out={out}"])
    assert code == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["aug.png"]  # no temp file left
    assert show_augment.label_text(np.array([0.0, 0.75, 0.25]), ["a", "b", "c"]) == "b 0.75 + c 0.25"
    assert show_augment.label_text(np.array([0.0, 1.0, 0.0]), ["a", "b", "c"]) == "b"
    bad = show_augment.run(["--mixup_alpha=-1", f"--out={out}"])
    assert bad == 2


def test_recipe_block_shows_once(capsys):
    """In the log when absl shows INFO lines (the commands), else printed: never both."""
    from absl import logging as absl_logging

    from keras_resnet.training.recipe import log_recipe

    before = absl_logging.get_verbosity()
    try:
        absl_logging.set_verbosity(absl_logging.INFO)
        log_recipe(Config())
        assert "Recipe:" not in capsys.readouterr().out
        absl_logging.set_verbosity(absl_logging.WARNING)
        log_recipe(Config())
        assert capsys.readouterr().out.count("Recipe:") == 1
    finally:
        absl_logging.set_verbosity(before)
