"""The model every deployment file is converted from, and what travels beside it.

The preprocessing contract, the same for every file format (ONNX, LiteRT, OpenVINO, their int8
versions):

    input  `images`: float32 [N, S, S, 3], RGB in 0..255, N dynamic, S the evaluation size: the
           image decoded, its shorter side resized to the export's resize_size (bilinear,
           antialiased; by default round(S * 256/224), a FixRes run's --eval_resize_size), then
           center-cropped to S x S, as `pipelines.preprocessing.preprocess_for_eval` does.
    output `probabilities`: float32 [N, C] (softmax over the classes).

The ImageNet mean/std normalisation is inside the model, so a client only decodes, resizes and
crops. The class ids and names, the sizes and this contract (`metadata`) travel beside every file
in `<FILE>.json`, and inside the file: an ONNX file's metadata_props, a LiteRT file's metadata
table and an OpenVINO IR's rt_info (the last two as one JSON entry named `METADATA_NAME`). The
int8 formats keep float32 input and output (quantize and dequantize inside).
The format writers (onnx.py, litert.py, openvino.py) build on this module; the table of formats
is formats.py.
"""

from keras_resnet import files

INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
SIDECAR_SUFFIX = ".json"
# `resize_size` names the metadata key, not a rule: a FixRes run (or --resize_size) exports at
# another shorter side than round(S * 256/224), and a client following this text must use it.
CONTRACT = ("float32 [N, S, S, 3] RGB 0..255 at S=image_size after resizing the shorter side to "
            "resize_size (bilinear, antialiased) and a center crop; mean/std normalisation inside; "
            "output probabilities float32 [N, C]")
# What a client of the weight files (torchvision, safetensors) feeds torchvision's ResNet.
TORCHVISION_CONTRACT = (
    "torchvision.models.resnetN(num_classes=C) loading these weights: float32 [N, 3, S, S] RGB "
    "scaled to 0..1 and normalised with mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225), "
    "at S=image_size after resizing the shorter side to resize_size and a center crop; output "
    "logits [N, C] (softmax for probabilities)")


class MissingExtra(ImportError):
    """A runtime or converter is not installed: the message names the pip extra to install."""


def require(module, extra):
    """Imports `module`, or raises MissingExtra saying `pip install 'keras_resnet[extra]'`."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(f"{module} is not installed; pip install 'keras_resnet[{extra}]' "
                           f"(or pip install {module.split('.')[0].replace('_', '-')})") from None


def deploy_model(model, image_size):
    """A float32 copy of `model` that takes float32 [N, S, S, 3] RGB 0..255 and returns
    probabilities, built from plain Keras layers.

    The training model takes uint8 (a float 127.6 would be cast to 127), may compute in bfloat16
    or float16 and uses FusedBatchNormalization (a TF raw op): the copy swaps in Keras's own
    BatchNormalization (the same variables and maths) and float32 everywhere, so converters see
    ordinary ops and the file computes what the float32 Keras model computes.
    """
    import keras

    from keras_resnet.model.layers import FusedBatchNormalization
    from keras_resnet.serving import export

    export._check_model(model, image_size)
    inputs = keras.Input((image_size, image_size, 3), dtype="float32", name=INPUT_NAME)
    clone = export.float32_model(
        model, input_tensors=inputs,
        layer_class=lambda layer: (keras.layers.BatchNormalization
                                   if isinstance(layer, FusedBatchNormalization)
                                   else layer.__class__))
    outputs = clone.outputs[0]
    if model.layers[-1].name == "logits":
        outputs = keras.layers.Softmax(name=OUTPUT_NAME, dtype="float32")(outputs)
    return keras.Model(inputs, outputs, name=f"{model.name}_deploy")


def serving_function(model, image_size):
    """`tf.function(images) -> {"probabilities": ...}` over `deploy_model`'s output, with a
    dynamic batch dimension; what the converters trace."""
    import tensorflow as tf

    deployed = deploy_model(model, image_size)

    @tf.function(input_signature=[tf.TensorSpec([None, image_size, image_size, 3], tf.float32,
                                                name=INPUT_NAME)])
    def serve(images):
        return {OUTPUT_NAME: deployed(images, training=False)}

    serve.deployed = deployed  # keeps the variables alive with the function
    return serve


# --- class names in and beside the file --------------------------------------------------------

# The name of the `metadata` entry inside a LiteRT file (its metadata table) and an OpenVINO file
# (its rt_info); ONNX files hold the keys themselves in metadata_props.
METADATA_NAME = "keras_resnet"


def metadata(*, fmt, image_size, class_ids, class_names, resize_size=0, contract=None):
    """What travels with every file: its sidecar, an ONNX file's metadata_props, a LiteRT file's
    metadata table and an OpenVINO IR's rt_info hold these keys. `resize_size`: the shorter side
    before the center crop (0: the evaluation's rule, image_size x 256/224). `contract`: a weight
    file's (TORCHVISION_CONTRACT: no named input or output); default CONTRACT."""
    from pipelines.preprocessing import eval_resize_size  # TensorFlow: writers only, not runners

    names = {} if contract else {"input": INPUT_NAME, "output": OUTPUT_NAME}
    return {"format": fmt, "image_size": image_size, **names,
            "resize_size": resize_size or eval_resize_size(image_size),
            "preprocessing": contract or CONTRACT, "class_ids": list(class_ids),
            "class_names": list(class_names)}


def sidecar_path(path):
    """`<FILE>.json`: the `metadata` of export `path`."""
    return path + SIDECAR_SUFFIX


def write_sidecar(path, meta):
    """Writes `meta` (from `metadata`) to the sidecar of export `path`, atomically (openvino.py
    then moves it into place together with the model)."""
    return files.write_json_atomic(sidecar_path(path), meta)


def write_with_sidecar(path, data, meta):
    """Writes export `path` (bytes `data`) and its sidecar (`meta`, from `metadata`) as a pair:
    a kill leaves the old pair, the new pair or the file alone (which carries `meta` inside),
    never a file beside another export's class names (`files.write_with_companion`)."""
    return files.write_with_companion(path, data, sidecar_path(path), files.json_bytes(meta))


def read_sidecar(path):
    """The sidecar of export `path` as a dict, or None when there is none."""
    return files.read_json(sidecar_path(path))
