"""Export a trained ResNet as a new SavedModel version for TF Serving.

    python -m keras_resnet.export --model_dir=runs/resnet50_imagenet --export_dir=saved_models/r50
    python -m keras_resnet.export --model=model.keras --export_dir=saved_models/r50
    python -m keras_resnet.export --model_dir=runs/r50 --format=torchvision --output=r50.pth
    python -m keras_resnet.export --model_dir=runs/r50 --format=safetensors --output=r50.safetensors

--format=torchvision writes a torch.save file that `torch.load(PATH, weights_only=True)` reads and
`torchvision.models.resnetN(num_classes=K).load_state_dict` accepts (strict); safetensors holds the
same tensors (torchvision / timm names).

The library is `keras_resnet.serving.export`; this module parses flags and calls it.
"""

import os
import sys

from absl import flags

from keras_resnet import cli


def define_flags(values):
    flags.DEFINE_string("model_dir", None, "Training directory: uses best.keras, else "
                        "latest.keras, and classes.json from it.", flag_values=values)
    flags.DEFINE_string("model", None, "A .keras file (instead of --model_dir).", flag_values=values)
    flags.DEFINE_string("export_dir", None, "Base directory of the versions.", flag_values=values)
    flags.DEFINE_string("classes", None, "classes.json (default: beside the model file).",
                        flag_values=values)
    # Weight files (keras_resnet.model.weights): no SavedModel, one file at --output.
    flags.DEFINE_enum("format", "saved_model", ["saved_model", "torchvision", "safetensors"],
                      "What to write.", flag_values=values)
    flags.DEFINE_string("output", None, "The file for --format=torchvision/safetensors.",
                        flag_values=values)
    flags.DEFINE_integer("image_size", None, "Eval crop size (default: the model's input size; "
                         "required when the model input size is dynamic).", flag_values=values)


def main(flag_values, args):
    if bool(flag_values.model) == bool(flag_values.model_dir):
        raise cli.UsageError("pass exactly one of --model=FILE.keras or --model_dir=DIR.")
    weights_file = flag_values.format in ("torchvision", "safetensors")
    if weights_file and not flag_values.output:
        raise cli.UsageError(f"--format={flag_values.format} needs --output=FILE.")
    if not weights_file and not flag_values.export_dir:
        raise cli.UsageError("--export_dir is required, e.g. --export_dir=saved_models/r50.")
    import keras

    from keras_resnet.serving import export

    path = flag_values.model
    if flag_values.model_dir:
        path = export.find_checkpoint(flag_values.model_dir)
        if path is None:
            return _fail(f"no {' or '.join(export.CHECKPOINT_NAMES)} in {flag_values.model_dir}; train "
                         "first or pass --model=FILE.keras.")
    if not os.path.isfile(path):
        return _fail(f"model file {path} not found.")
    try:
        model = keras.saving.load_model(path, compile=False)
        if weights_file:
            from keras_resnet.model import weights

            print(weights.write_weights(model, flag_values.output, flag_values.format))
            return 0
        image_size = flag_values.image_size or model.inputs[0].shape[1]
        if image_size is None:
            return _fail(f"{path} takes images of any size; pass --image_size.")
        class_ids, class_names = export.load_classes_for(path, model.outputs[0].shape[-1],
                                                         flag_values.classes)
        version_dir = export.export_saved_model(model, flag_values.export_dir, image_size=image_size,
                                                class_ids=class_ids, class_names=class_names)
    except (ValueError, TypeError, OSError) as e:
        return _fail(str(e).splitlines()[0])
    print(version_dir)
    return 0


def _fail(message):
    print(f"error: {message}", file=sys.stderr)
    return 1


def run(argv=None):
    """The command with `argv` (without the program name; default: sys.argv); exit status."""
    return cli.run(define_flags, main, argv, prog="keras_resnet.export", doc=__doc__)


if __name__ == "__main__":
    sys.exit(run())
