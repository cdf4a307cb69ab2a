"""OpenVINO IR export (`model.xml` + `model.bin`) and inference in the OpenVINO runtime.

Takes `images` float32 [N, S, S, 3] and returns `probabilities` float32 [N, C] (the contract in
serving/deploy.py). Converted by OpenVINO's TensorFlow frontend from the traced function of
`deploy.deploy_model` (Keras's `model.export(format="openvino")` imports Keras's OpenVINO backend,
which needs scipy, and converts the uint8-input training model). Weights stay float32
(`compress_to_fp16=False`), and the runner asks the CPU plugin for float32 inference: by default it
computes in bfloat16 on CPUs that have it, which moves probabilities by ~1e-2. The .xml's rt_info
holds `deploy.metadata` (class ids and names, sizes, the input contract) as JSON under
`deploy.METADATA_NAME`, as the sidecar does; `read_metadata` reads it.
"""

from __future__ import annotations

import json
import os
import shutil

from keras_resnet import files
from keras_resnet.serving import deploy


def write_openvino(model, output, *, image_size, class_ids, class_names, calibration=None,
                   resize_size=0):
    """Writes `output` (.xml), the weights beside it (.bin) and `<output>.json`; returns `output`.
    The files are replaced as a unit (`write_ir`)."""
    ov = deploy.require("openvino", "openvino")
    serve = deploy.serving_function(model, image_size)  # alive until converted (onnx.to_onnx)
    ov_model = ov.convert_model(serve.get_concrete_function())
    return write_ir(ov_model, output, deploy.metadata(
        fmt="openvino", image_size=image_size, class_ids=class_ids, class_names=class_names,
        resize_size=resize_size))


def write_ir(ov_model, output, meta):
    """Writes `ov_model` (an openvino.Model) as `output` (.xml) and its .bin, with `meta` (from
    `deploy.metadata`) in its rt_info and in `<output>.json`; returns `output`.

    OpenVINO finds the weights of `x.xml` in `x.bin`, and no rename moves two files at once, so the
    three files are replaced as a unit around the .xml. All are written in a temporary directory
    beside `output`; the old .xml is moved aside (into that directory) first, then the old .bin
    and sidecar; then the new sidecar, .bin and, last, .xml are renamed into place. So at every
    moment, after a kill too, `output` is absent (a client gets file-not-found) or is the old or
    the new .xml with its own .bin and sidecar, never a mixed pair. An error puts the old files
    back (the message says whether they are); a kill between the first and last rename leaves no
    .xml, and the moved files are deleted by the next export (`files.remove_stale_temps`). Not
    covered: a client that read the old .xml just before the swap and opens the .bin after it.
    """
    ov = deploy.require("openvino", "openvino")
    ov_model.set_rt_info(json.dumps(meta, ensure_ascii=False), deploy.METADATA_NAME)
    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    files.remove_stale_temps(parent)
    tmp = files.make_temp_dir(parent, "openvino")
    new = os.path.join(tmp, "model.xml")
    # (new, final) in the order they go into place, the .xml last; the old ones go aside in the
    # reverse order, the .xml first.
    place = [(deploy.sidecar_path(new), deploy.sidecar_path(output)),
             (weights_path(new), weights_path(output)), (new, output)]
    aside = []
    try:
        ov.save_model(ov_model, new, compress_to_fp16=False)
        deploy.write_sidecar(new, meta)
        aside = [(final, os.path.join(tmp, f"old{i}"))
                 for i, (_, final) in enumerate(reversed(place)) if os.path.lexists(final)]
        files.rename_all([*aside, *place])
    except OSError as e:
        stranded = [os.path.basename(final) for final, moved in aside if os.path.lexists(moved)]
        if os.path.exists(output):
            kept = "kept the previous export"
        elif stranded:  # putting the old files back failed too: keep them where they are
            kept = (f"left no {os.path.basename(output)}; the previous {', '.join(stranded)} "
                    f"are in {tmp} (old0, old1, ... in that order)")
            tmp = None
        else:
            kept = f"left no {os.path.basename(output)}"
        raise OSError(f"OpenVINO export to {output} failed and {kept}: {e}") from e
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return output


def weights_path(xml_path):
    """OpenVINO reads the weights of `x.xml` from `x.bin`."""
    return os.path.splitext(xml_path)[0] + ".bin"


def read_metadata(model):
    """`deploy.metadata` from the rt_info of `model` (an openvino.Model read from the .xml) as a
    dict; None for a file exported before it was stored there."""
    if not model.has_rt_info(deploy.METADATA_NAME):
        return None
    return json.loads(model.get_rt_info(deploy.METADATA_NAME).astype(str))


class OpenVINORunner:
    """`runner(images float32 [N, S, S, 3]) -> probabilities [N, C]` in OpenVINO (no TF)."""

    format = "openvino"

    def __init__(self, path, threads=0):
        ov = deploy.require("openvino", "openvino")
        config = {"INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        core = ov.Core()
        model = core.read_model(path)
        meta = read_metadata(model) or deploy.read_sidecar(path) or {}  # the file's own first
        self.compiled = core.compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.image_size = self.compiled.inputs[0].get_partial_shape()[1].get_length()
        self.class_ids = meta.get("class_ids")
        self.class_names = meta.get("class_names", self.class_ids)
        self.resize_size = int(meta.get("resize_size", 0))

    def __call__(self, images):
        return self.request.infer({0: images})[0]
