"""A FixRes run's directory, as train_main writes it, for the export and deploy tests."""

import json

import keras
import numpy as np

from keras_resnet.model.resnet import build_resnet
from keras_resnet.serving import export

# Trained at 32 px, evaluated with a 40 px center crop of a 52 px shorter side.
CONFIG = {"image_size": 32, "train_image_size": 32, "eval_image_size": 40,
          "eval_resize_size": 52}


def write_fixres_run(directory, class_ids, class_names):
    """Writes best.keras (a ResNet-18 of any input size with a random, confident classifier),
    classes.json and config.json into `directory` (a pathlib.Path); returns the model."""
    keras.utils.set_random_seed(0)
    model = build_resnet(18, num_classes=len(class_ids), input_shape=(None, None, 3),
                         include_preprocessing=True)
    kernel = model.get_layer("predictions").kernel
    kernel.assign(np.random.default_rng(0).normal(0, 0.3, kernel.shape).astype("float32"))
    directory.mkdir(parents=True, exist_ok=True)
    model.save(directory / "best.keras")
    export.write_classes_json(directory / "classes.json", class_ids, class_names)
    (directory / "config.json").write_text(json.dumps(CONFIG))
    return model
