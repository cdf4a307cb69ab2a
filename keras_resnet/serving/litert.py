"""LiteRT (TFLite) export, float32 or int8, and inference in the LiteRT runtime.

Both files take `images` float32 [N, S, S, 3] and return `probabilities` float32 [N, C] (the
contract in serving/deploy.py), through the signature `serving_default`. The model's metadata
table holds an entry `keras_resnet` (`METADATA_NAME`) whose buffer is `deploy.metadata` as UTF-8
JSON, the content of `<FILE>.json` (class ids and names, sizes, the input contract), so the file
alone is enough to label predictions; `read_metadata` reads it back without TensorFlow.

The int8 file is quantized after training from calibration images of the training split: weights
int8 per channel, activations int8 per tensor (ranges: min/max over the calibration images); every
convolution (with its ReLU), padding and max pooling is an int8 kernel.

It is not full-integer, although the issue asked for full-integer where the runtime supports it
(LiteRT does). The op types in `FLOAT_OPS` stay float32: the input's normalisation (SUB, MUL,
DIV), the residual additions (ADD: each block's output is dequantized, added in float32 and
quantized again) and the head (MEAN, FULLY_CONNECTED, SOFTMAX). Why, measured on the demo
validation split's first version (250 images, one = 0.4%) over trainings of the tests' demo
model: full-integer agreed with the Keras top-1 on 98.0-99.6% of the images (five trainings);
normalisation and head alone in float32, 98.8% on four trainings of five; with the residual
additions in float32 too, 98.8-100%, at most 0.8 points lost (seven trainings, 98.8% on one; the
issue's bar: >= 99%, <= 1 point). On today's 2,000 images: 99.25%, 99.45% and 99.65% (three
trainings), within 0.25 points.
Accuracy was chosen over full integer. A client still feeds float32 and reads float32 (no scale
or zero point); an integer-only accelerator (Edge TPU, some NPUs) would have to leave the float
ops to the CPU.

Converted by TensorFlow's own converter (`tf.lite.TFLiteConverter`, from a SavedModel as Keras's
`model.export(format="litert")` does, but of `deploy.deploy_model`); the ops are kept float by the
converter's quantization debugger (`tf.lite.experimental.QuantizationDebugger`, its public way to
leave op types out of quantization). Run by `ai-edge-litert`, LiteRT's standalone runtime, which
needs no TensorFlow.
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy

from keras_resnet.serving import deploy

SIGNATURE = "serving_default"
METADATA_NAME = deploy.METADATA_NAME  # the metadata entry holding deploy.metadata as JSON
# litert_int8: TFLite op types left in float32 (normalisation, residual additions, head); see above.
FLOAT_OPS = ("SUB", "MUL", "DIV", "ADD", "MEAN", "FULLY_CONNECTED", "SOFTMAX")


def to_tflite(model, *, image_size, calibration=None):
    """The .tflite bytes of `model`; int8 when `calibration` (a callable yielding float32
    [1, S, S, 3] images) is given."""
    import keras
    import tensorflow as tf

    serve = deploy.serving_function(model, image_size)
    with tempfile.TemporaryDirectory() as saved_model:
        archive = keras.export.ExportArchive()
        archive.track(serve.deployed)
        archive.add_endpoint(SIGNATURE, serve)
        archive.write_out(saved_model, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(saved_model, [SIGNATURE])
        if calibration is None:
            return converter.convert()
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([image] for image in calibration())
        # The debugger calibrates once (converter.convert() in calibrate-only mode), then
        # quantizes every op but FLOAT_OPS; fully_quantize=False keeps float32 input and output.
        # No model_debug_metrics: it does not convert a float model or run any images itself.
        debugger = tf.lite.experimental.QuantizationDebugger(
            converter=converter,
            debug_options=tf.lite.experimental.QuantizationDebugOptions(
                denylisted_ops=list(FLOAT_OPS), fully_quantize=False))
        return debugger.get_nondebug_quantized_model()


def write_litert(model, output, *, image_size, class_ids, class_names, calibration=None,
                 resize_size=0, quantize=False):
    """Writes `output` (.tflite) and `<output>.json` atomically; returns `output`."""
    fmt = "litert_int8" if quantize else "litert"
    if quantize and calibration is None:
        raise ValueError("litert_int8 needs calibration images from the training split "
                         "(--dataset, --data_dir and --calibration_images).")
    meta = deploy.metadata(fmt=fmt, image_size=image_size, class_ids=class_ids,
                           class_names=class_names, resize_size=resize_size)
    data = to_tflite(model, image_size=image_size, calibration=calibration if quantize else None)
    return deploy.write_with_sidecar(output, with_metadata(data, meta), meta)


def with_metadata(data, meta):
    """`data` (.tflite bytes) with `meta` (a dict) as UTF-8 JSON in a new buffer, named by a
    `METADATA_NAME` entry of the model's metadata table. Repacked through TensorFlow's flatbuffer
    object API, as the converter itself does to add its conversion metadata: the graph and weights
    are unchanged."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    tflite = flatbuffer_utils.read_model_from_bytearray(bytearray(data))
    buffer = schema.BufferT()
    buffer.data = numpy.frombuffer(json.dumps(meta, ensure_ascii=False).encode("utf-8"),
                                   numpy.uint8)
    entry = schema.MetadataT()
    entry.name, entry.buffer = METADATA_NAME, len(tflite.buffers)
    tflite.buffers.append(buffer)
    tflite.metadata = [*(tflite.metadata or []), entry]
    return flatbuffer_utils.convert_object_to_bytearray(tflite)


def read_metadata(path):
    """The `METADATA_NAME` entry of the .tflite file `path` as a dict; None when there is none (a
    file exported before it existed). Parsed with the flatbuffer schema that ai-edge-litert ships
    (with the `flatbuffers` package it depends on), so a LiteRT client needs no TensorFlow."""
    schema = deploy.require("ai_edge_litert.schema_py_generated", "litert")
    with open(path, "rb") as f:
        tflite = schema.Model.GetRootAs(f.read(), 0)
    for i in range(tflite.MetadataLength()):
        entry = tflite.Metadata(i)
        if entry.Name() == METADATA_NAME.encode():
            return json.loads(tflite.Buffers(entry.Buffer()).DataAsNumpy().tobytes())
    return None


class LiteRTRunner:
    """`runner(images float32 [N, S, S, 3]) -> probabilities [N, C]` in LiteRT (no TF)."""

    format = "litert"

    def __init__(self, path, threads=0):
        interpreter = deploy.require("ai_edge_litert.interpreter", "litert")
        self.interpreter = interpreter.Interpreter(model_path=path,
                                                   num_threads=threads or os.cpu_count())
        (self.input,) = self.interpreter.get_input_details()
        (self.output,) = self.interpreter.get_output_details()
        self.image_size = int(self.input["shape_signature"][1])
        self._batch = None
        meta = read_metadata(path) or deploy.read_sidecar(path) or {}  # the file's own first
        self.class_ids = meta.get("class_ids")
        self.class_names = meta.get("class_names", self.class_ids)
        self.resize_size = int(meta.get("resize_size", 0))
        if any(t["dtype"] == numpy.int8 for t in self.interpreter.get_tensor_details()):
            self.format = "litert_int8"

    def __call__(self, images):
        if images.shape[0] != self._batch:  # the batch dimension is dynamic: size it per call
            self.interpreter.resize_tensor_input(self.input["index"], images.shape)
            self.interpreter.allocate_tensors()
            self._batch = images.shape[0]
        self.interpreter.set_tensor(self.input["index"], images)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.output["index"])
