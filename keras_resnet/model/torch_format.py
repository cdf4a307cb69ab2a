"""`torch.save` files read and written with NumPy alone: no torch import, no pickled code run.

The zip format of `torch.save` (torch >= 1.6) holds, under one top folder (any name):
  data.pkl      the object, pickled; each tensor is `torch._utils._rebuild_tensor_v2(storage,
                offset, size, stride, requires_grad, hooks)` and each storage a persistent id
                `("storage", torch.<Type>Storage, key, location, numel)`
  data/<key>    the storage's raw bytes, in the byte order named by `byteorder`
  byteorder     "little" or "big" (absent in old files: little)
  version       the format version ("3")
`torch.load` unpickles `data.pkl`, so a file can run any code on load. `read_torch_file` uses an
unpickler that resolves only the globals a state dict needs (tensor rebuilds, storage types,
`collections.OrderedDict`) and refuses any other global by name, before anything is called.
`write_torch_file` writes the same format (pickle protocol 2, the ids and reductions torch
writes), which `torch.load(path, weights_only=True)` reads.
"""

import collections
import io
import math
import pickle
import zipfile

import numpy as np

from keras_resnet.model.errors import WeightsError

# torch storage type -> NumPy dtype ("bfloat16" has none: read as uint16, widened to float32).
STORAGE_DTYPES = {
    "DoubleStorage": "f8", "FloatStorage": "f4", "HalfStorage": "f2", "BFloat16Storage": "bf16",
    "LongStorage": "i8", "IntStorage": "i4", "ShortStorage": "i2", "CharStorage": "i1",
    "ByteStorage": "u1", "BoolStorage": "?",
}
_DTYPE_STORAGES = {np.dtype(v): k for k, v in STORAGE_DTYPES.items() if v != "bf16"}
_ZIP_ALIGNMENT = 64  # torch aligns each record's data to 64 bytes (needed for mmap loading)
FORMAT_VERSION = b"3\n"


# ----------------------------------------------------------------------------------- reading

class _StorageType:
    """Stands in for `torch.<Name>Storage` while unpickling."""

    def __init__(self, name):
        self.name = name


def _bf16_to_f32(raw):
    return (raw.astype(np.uint32) << 16).view(np.float32)


MAX_REPEATED_ELEMENTS = 1 << 24  # 16 Mi elements, 64 MiB of float32


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None,
                       metadata=None):
    """`torch._utils._rebuild_tensor_v2` for NumPy: a strided view of the storage, copied."""
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    offset = int(offset)
    if len(size) != len(stride) or offset < 0 or any(s < 0 for s in size + stride):
        raise WeightsError(f"malformed tensor record (size {size}, stride {stride}, offset "
                           f"{offset}); the file is damaged.")
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) if all(size) else offset - 1
    if last >= storage.size:
        raise WeightsError(f"a tensor of size {size} reads past the end of its storage "
                           f"({storage.size} elements); the file is damaged or truncated.")
    if not all(size):
        return np.zeros(size, storage.dtype)
    # A view that repeats its storage (stride 0, torch's `expand`) is copied out whole: a few
    # bytes on disk could ask for any amount of memory. Weights are never such views; small
    # ones are let through, a large one is refused.
    elements = math.prod(size)
    if elements > storage.size and elements > MAX_REPEATED_ELEMENTS:
        raise WeightsError(f"a tensor of size {size} repeats its {storage.size:,}-element "
                           "storage (an expanded view); ResNet weights are not: not a ResNet "
                           "state dict.")
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], size, [s * item for s in stride])
    return np.array(view)


def _rebuild_parameter(data, requires_grad=False, hooks=None, *args):
    return data


# (module, name) -> the object the restricted unpickler returns for it.
_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only `_ALLOWED` globals; storages come from `load_storage(type, key, numel)`."""

    def __init__(self, file, load_storage):
        super().__init__(file, encoding="utf-8")
        self._load_storage = load_storage

    def find_class(self, module, name):
        allowed = _ALLOWED.get((module, name))
        if allowed is None:
            raise WeightsError(
                f"refused to load: the file's pickle asks for the global {module}.{name}, which a "
                "weights file does not need (only tensors and dicts are read; nothing in the file "
                "was run). Re-save it as a state dict: torch.save(model.state_dict(), PATH).")
        return allowed

    def persistent_load(self, pid):
        if (not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage"
                or not isinstance(pid[1], _StorageType)):
            raise WeightsError(f"refused to load: unknown persistent id {str(pid)[:80]!r} in the "
                               "file's pickle (only torch storages are read).")
        _, storage_type, key, _location, numel = pid
        return self._load_storage(storage_type.name, str(key), int(numel))


def is_torch_zip(names):
    """True when the zip member `names` hold a torch.save archive (`<top>/data.pkl`)."""
    return any(n.endswith("/data.pkl") and n.count("/") == 1 for n in names)


def read_torch_file(path):
    """The object `torch.save` stored at `path` (zip format), tensors as NumPy arrays.

    Raises WeightsError (one line) for a file that is not such an archive, is truncated, or whose
    pickle names any global besides tensor rebuilds, storage types and OrderedDict.
    """
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise WeightsError(f"{path} is not a complete zip archive (truncated or not a torch.save "
                           "file of torch >= 1.6).") from None
    with archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if not pickles:
            raise WeightsError(f"{path} is a zip file without <dir>/data.pkl: not a torch.save file.")
        top = pickles[0][: -len("data.pkl")]
        order = "<"
        if f"{top}byteorder" in names:
            order = {"little": "<", "big": ">"}.get(archive.read(f"{top}byteorder").decode().strip())
            if order is None:
                raise WeightsError(f"{path}: unknown byteorder record.")
        storages = {}

        def load_storage(type_name, key, numel):
            if key not in storages:
                storages[key] = _read_storage(archive, f"{top}data/{key}", type_name, numel,
                                              order, path)
            return storages[key]

        try:
            data = archive.read(pickles[0])
            return _RestrictedUnpickler(io.BytesIO(data), load_storage).load()
        except WeightsError:
            raise
        except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError, KeyError, ValueError,
                TypeError, AttributeError, IndexError) as e:
            raise WeightsError(f"{path} is damaged or truncated ({type(e).__name__}: "
                               f"{str(e).splitlines()[0][:120] if str(e) else 'no detail'}).") from None


def _read_storage(archive, name, type_name, numel, order, path):
    try:
        raw = archive.read(name)
    except KeyError:
        raise WeightsError(f"{path} lacks the storage record {name}; the file is damaged.") from None
    kind = STORAGE_DTYPES[type_name]
    dtype = np.dtype(order + ("u2" if kind == "bf16" else kind))
    if len(raw) != numel * dtype.itemsize:
        raise WeightsError(f"{path}: storage {name} holds {len(raw)} bytes, expected "
                           f"{numel * dtype.itemsize}; the file is damaged or truncated.")
    array = np.frombuffer(raw, dtype).astype(dtype.newbyteorder("="))
    return _bf16_to_f32(array) if kind == "bf16" else array


# ----------------------------------------------------------------------------------- writing

class _Global:
    """A global written as the GLOBAL opcode by name, with no such object imported."""

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle requires a reduction's function to be callable
        raise TypeError(f"{self.module}.{self.name} is a name to write, not a function.")


class _Storage:
    def __init__(self, key, array):
        self.key, self.array = key, array


class _Tensor:
    """Pickles as torch does: `_rebuild_tensor_v2(storage, 0, size, stride, False, {})`."""

    def __init__(self, storage):
        self.storage = storage

    def __reduce__(self):
        array = self.storage.array
        stride = tuple(s // array.itemsize for s in array.strides)
        return (_Global("torch._utils", "_rebuild_tensor_v2"),
                (self.storage, 0, tuple(array.shape), stride, False, collections.OrderedDict()))


class _Pickler(pickle._Pickler):  # the Python pickler: its `save` can be extended
    def save(self, obj, save_persistent_id=True):
        if isinstance(obj, _Global):
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
            return
        super().save(obj, save_persistent_id)

    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            type_name = _DTYPE_STORAGES[obj.array.dtype]
            return ("storage", _Global("torch", type_name), obj.key, "cpu", obj.array.size)
        return None


def torch_file_bytes(obj, archive_name="archive"):
    """The bytes of `torch.save(obj)` (zip format) for a state dict `{name: np.ndarray}`, or a
    dict nesting one (`{"state_dict": {...}, "epoch": 90}`). Each array becomes a CPU tensor with
    its own storage (dtypes as in STORAGE_DTYPES; no bfloat16); dicts of arrays are OrderedDicts,
    as `state_dict()` returns."""
    storages = []

    def wrap(value):
        if isinstance(value, np.ndarray):
            array = np.array(value, dtype=value.dtype.newbyteorder("<"), order="C")
            if array.dtype.newbyteorder("=") not in _DTYPE_STORAGES:
                raise WeightsError(f"dtype {array.dtype} has no torch storage type.")
            storages.append(_Storage(str(len(storages)), array))
            return _Tensor(storages[-1])
        if isinstance(value, dict):
            return collections.OrderedDict((k, wrap(v)) for k, v in value.items())
        return value

    pkl = io.BytesIO()
    _Pickler(pkl, protocol=2).dump(wrap(obj))
    records = [("data.pkl", pkl.getvalue()), ("byteorder", b"little")]
    records += [(f"data/{s.key}", s.array.tobytes()) for s in storages]
    records += [("version", FORMAT_VERSION)]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for name, data in records:
            _write_aligned(archive, out, f"{archive_name}/{name}", data)
    return out.getvalue()


def _write_aligned(archive, out, name, data):
    """A stored zip record whose data starts at a multiple of _ZIP_ALIGNMENT, as torch writes."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    header = 30 + len(name.encode())  # local file header: fixed part + name
    pad = -(out.tell() + header + 4) % _ZIP_ALIGNMENT
    # Extra field id 0xFE (unregistered, as torch uses) carrying the padding.
    info.extra = b"\xfe\x00" + pad.to_bytes(2, "little") + b"Z" * pad
    archive.writestr(info, data)
