"""Small file helpers with no TensorFlow import (the download command uses them too)."""

import json
import os
import tempfile


def write_json_atomic(path, data):
    """Writes JSON to a temp file in the same directory, fsyncs, and renames it over `path`:
    a reader (or a restart after a crash) never sees half a file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path, default=None):
    """The JSON at `path`, or `default` when there is no such file."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return default
