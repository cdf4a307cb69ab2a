"""The learning-rate schedule and the loss against their formulas, and the schedule a Config
derives (peak rate, warm-up, decay boundaries)."""

import math

import numpy as np
import pytest

from keras_resnet.training.config import Config
from keras_resnet.training.optim import SparseCrossentropy, WarmupSchedule


def rates(schedule, steps):
    return [float(schedule(step)) for step in steps]


def test_warmup_is_linear_from_the_first_step_to_the_peak():
    schedule = WarmupSchedule(peak_lr=0.4, total_steps=100, warmup_steps=10)
    # Step s (0-based) of warm-up trains at peak * (s + 1) / warmup: never at 0.
    assert rates(schedule, [0, 4, 9]) == pytest.approx([0.04, 0.2, 0.4])


def test_cosine_decays_from_the_peak_to_zero_after_warmup():
    schedule = WarmupSchedule(peak_lr=0.4, total_steps=110, warmup_steps=10)
    steps = [10, 35, 60, 85, 110, 500]
    want = [0.5 * 0.4 * (1 + math.cos(math.pi * min((s - 10) / 100, 1.0))) for s in steps]
    assert rates(schedule, steps) == pytest.approx(want, abs=1e-7)
    assert rates(schedule, [10, 60, 110]) == pytest.approx([0.4, 0.2, 0.0], abs=1e-7)


def test_step_decay_multiplies_by_a_tenth_at_each_boundary():
    schedule = WarmupSchedule(peak_lr=1.0, total_steps=100, warmup_steps=0, kind="step",
                              boundaries=(30, 60))
    assert rates(schedule, [0, 29, 30, 59, 60, 99]) == pytest.approx(
        [1.0, 1.0, 0.1, 0.1, 0.01, 0.01])


def test_schedule_survives_serialization():
    schedule = WarmupSchedule(peak_lr=0.3, total_steps=50, warmup_steps=5, kind="step",
                              boundaries=(20,))
    again = WarmupSchedule.from_config(schedule.get_config())
    assert rates(again, range(0, 50, 7)) == rates(schedule, range(0, 50, 7))


def test_config_derives_peak_rate_warmup_and_boundaries():
    from keras_resnet.training import run

    config = Config(batch_size=1024, base_learning_rate=0.1, epochs=90, warmup_epochs=5,
                    lr_schedule="step", step_decay_epochs=(30, 60, 80))
    schedule = run.learning_rate_schedule(config, steps_per_epoch=100)
    assert config.learning_rate == pytest.approx(0.4)  # 0.1 per 256 images, linear scaling
    assert schedule.warmup_steps == 500 and schedule.total_steps == 9000
    assert schedule.boundaries == (3000, 6000, 8000)
    # Short runs keep their warm-up under a sixth of the run, so they still decay.
    short = run.learning_rate_schedule(Config(epochs=6, warmup_epochs=5), steps_per_epoch=10)
    assert short.warmup_steps == 10


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_label_smoothing_is_cross_entropy_against_the_smoothed_target(smoothing):
    rng = np.random.default_rng(0)
    num_classes = 5
    logits = rng.normal(size=(8, num_classes)).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    labels = rng.integers(0, num_classes, size=8)
    target = np.full((8, num_classes), smoothing / num_classes)
    target[np.arange(8), labels] += 1.0 - smoothing
    want = float(np.mean(-(target * np.log(probs)).sum(-1)))

    loss = SparseCrossentropy(num_classes, label_smoothing=smoothing)
    assert float(loss(labels, probs)) == pytest.approx(want, rel=1e-5)
    from_logits = SparseCrossentropy(num_classes, label_smoothing=smoothing, from_logits=True)
    assert float(from_logits(labels, logits)) == pytest.approx(want, rel=1e-5)


def test_loss_ignores_weight_zero_padding():
    probs = np.array([[0.7, 0.3], [0.5, 0.5]], np.float32)
    loss = SparseCrossentropy(2)
    alone = float(loss(np.array([0]), probs[:1]))
    assert float(loss(np.array([0, 1]), probs, sample_weight=np.array([1.0, 0.0]))) == \
        pytest.approx(alone, rel=1e-6)
    assert alone == pytest.approx(-math.log(0.7), rel=1e-6)


@pytest.mark.parametrize("nesterov", [False, True])
def test_fused_sgd_steps_exactly_as_keras_sgd(nesterov):
    import keras

    from keras_resnet.training.sgd import SGD

    rng = np.random.default_rng(0)
    start = [rng.normal(size=(3, 3, 4, 8)).astype("float32"), rng.normal(size=(8,)).astype("float32")]
    grads = [[rng.normal(size=w.shape).astype("float32") for w in start] for _ in range(5)]
    schedule = WarmupSchedule(peak_lr=0.4, total_steps=10, warmup_steps=2)
    ends = []
    for optimizer in (SGD(schedule, momentum=0.9, nesterov=nesterov),
                      keras.optimizers.SGD(schedule, momentum=0.9, nesterov=nesterov)):
        variables = [keras.Variable(w) for w in start]
        for step in grads:
            optimizer.apply(step, variables)
        ends.append([v.numpy() for v in variables])
    for fused, keras_sgd, w in zip(*ends, start, strict=True):
        assert not np.allclose(fused, w)  # it stepped
        np.testing.assert_allclose(fused, keras_sgd, rtol=1e-6, atol=1e-6)
