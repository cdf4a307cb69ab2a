"""The recipe flags of a Config turned into what the run's stages take: dataset arguments,
model input shape, metrics and the EMA. Keeps run.py's hooks one line each."""

from absl import logging

from keras_resnet.training import ema as ema_lib


def uses_soft_labels(config) -> bool:
    """True when training batches carry mixup / cutmix soft labels."""
    return (config.mixup_alpha > 0 or config.cutmix_alpha > 0) and config.mix_prob > 0


def model_input_shape(config):
    """(S, S, 3) when training and evaluation share a size, else (None, None, 3) (FixRes: the
    global average pool makes the network size-agnostic)."""
    train, evaluate = config.resolved_train_image_size, config.resolved_eval_image_size
    return (train, train, 3) if train == evaluate else (None, None, 3)


def train_dataset_options(config, num_classes):
    """Keyword arguments of pipelines.dataset.build_train_dataset for the recipe flags."""
    from pipelines import augment

    return dict(
        image_size=config.resolved_train_image_size,
        crop_area_range=config.crop_area_range,
        crop_aspect_range=config.crop_aspect_range,
        augment=augment.ImageAugment(
            auto_augment=config.auto_augment, ra_num_ops=config.ra_num_ops,
            ra_magnitude=config.ra_magnitude, random_erase=config.random_erase,
            random_erase_value=config.random_erase_value),
        mix=augment.BatchMix(mixup_alpha=config.mixup_alpha, cutmix_alpha=config.cutmix_alpha,
                             switch_prob=config.mix_switch_prob, prob=config.mix_prob),
        num_classes=num_classes,
        repeated_aug=config.repeated_aug,
    )


def eval_dataset_options(config):
    """Keyword arguments of pipelines.dataset.build_eval_dataset for the recipe flags."""
    return dict(image_size=config.resolved_eval_image_size,
                resize_size=config.resolved_eval_resize_size)


def make_ema(config, model):
    """The WeightEMA of `model` (in the strategy scope), or None when --ema is off."""
    if not config.ema:
        return None
    return ema_lib.WeightEMA(model, config.ema_update_decay, config.ema_every_steps,
                             config.ema_warmup)


def log_recipe(config):
    """The resolved recipe as one block in the start-up log."""
    text = "\n".join("  " + line for line in config.recipe_lines())
    if logging.level_info():
        logging.info("Recipe:\n%s", text)
    else:  # called as a library, with absl's INFO lines off: the block still shows, once
        print("Recipe:\n" + text, flush=True)


def best_model_options(ema):
    """CheckpointCallback arguments: with an EMA, the best model is chosen on, and saved from,
    the EMA weights."""
    if ema is None:
        return {}
    return dict(monitor="val_top1_ema", best_weights=ema.swapped)


def with_ema_callback(callbacks, ema, validation_data, validation_steps):
    """`callbacks` with the EMA's callback before the checkpoint callback (which then sees the
    `val_*_ema` logs); unchanged without an EMA."""
    if ema is None:
        return callbacks
    from keras_resnet.training import checkpoint

    ema_cb = ema_lib.EMACallback(ema, validation_data, validation_steps)
    at = next((i for i, c in enumerate(callbacks)
               if isinstance(c, checkpoint.CheckpointCallback)), len(callbacks))
    return callbacks[:at] + [ema_cb] + callbacks[at:]
