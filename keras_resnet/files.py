"""Atomic writes and stale-temp cleanup: the one place files reach their final name.

Every file or directory a reader might pick up (checkpoints' side files, `best.keras`, JSON
records, exports, the demo tree, the file index, extracted images) is written under a hidden
temporary name in the target's own directory and renamed when complete, so a reader (or a run
restarted after `kill -9`) sees the old file or the new one, never half of one. Temporary names
are `.tmp-<pid>-<random>-<name>`; `remove_stale_temps` deletes those whose process is gone.

No TensorFlow import: the download and the data sources use this module too.
"""

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import uuid
import warnings

TMP_PREFIX = ".tmp-"
_TMP_NAME = re.compile(re.escape(TMP_PREFIX) + r"(\d+)-")


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NO_SPACE_TEXT = tuple(os.strerror(code) for code in _NO_SPACE)  # as TensorFlow's errors say it
# TensorFlow's file errors read "{{function_node ...}} <path>; No space left on device [Op:...]"
# (the path may hold spaces); elsewhere, the word before "; No space ...".
_NO_SPACE_ALTERNATIVES = "(?:" + "|".join(map(re.escape, _NO_SPACE_TEXT)) + ")"
_PATH_IN_TEXT = (re.compile(r"\}\}\s*([^;{}]+); " + _NO_SPACE_ALTERNATIVES),
                 re.compile(r"(\S+); " + _NO_SPACE_ALTERNATIVES))


def no_space_message(error, where, then):
    """One line for a write that failed for lack of disk space (an OSError ENOSPC or EDQUOT, or
    TensorFlow's ResourceExhaustedError from a file write, which says 'No space left on device');
    None for any other error. `where`: the folder to name when the error names no path; `then`:
    what running the same command again does."""
    if isinstance(error, OSError) and error.errno in _NO_SPACE:
        path = error.filename
    elif any(text in str(error) for text in _NO_SPACE_TEXT):
        found = next(filter(None, (p.search(str(error)) for p in _PATH_IN_TEXT)), None)
        path = found.group(1) if found else None
    else:
        return None
    if path:  # the folder a user knows: the one above the first temporary in the path
        parts = path.split(os.sep)
        temporary = next((i for i, part in enumerate(parts) if _is_temporary(part)), len(parts))
        path = os.sep.join(parts[:temporary]) or None
    return (f"no space left on device writing {path or where}; free space and run the same "
            f"command again ({then}).")


def _is_temporary(name):
    """Our temporaries, and TensorFlow's checkpoint ones (`ckpt-8_temp/part-...tempstate...`)."""
    return name.startswith(TMP_PREFIX) or name.endswith("_temp") or "tempstate" in name


def temp_name(path):
    """A hidden temporary path beside `path` that keeps its name (and so its extension, which
    Keras and matplotlib read to choose a format)."""
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}-{name}")


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path to write `path` through (by any writer: `model.save`, `savefig`,
    a copy); renames it onto `path` when the block ends without an exception, else removes it."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = temp_name(path)
    try:
        yield tmp
        _fsync_file(tmp)
        if os.path.isfile(tmp):  # some writers (safetensors) create their file private (0600)
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        remove_path(tmp)


def remove_path(path):
    """Removes the file, link or folder (with its contents) at `path`, if there is one."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def _umask():
    """The process's umask, read without changing it where Linux shows it (/proc/self/status):
    setting it to read it would race with threads creating files meanwhile."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere reading the umask means setting it: set it back at once
    os.umask(mask)
    return mask


def write_bytes_atomic(path, data):
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return path


def write_with_companion(path, data, companion, companion_data):
    """Writes `path` (bytes `data`) and `companion` (bytes `companion_data`, a file that
    describes it, such as its class names) so that at every moment, after a kill too, the two are
    the old pair, the new pair, or a file without its companion: never a file beside another
    one's companion. The old companion is moved aside first, then the new file and the new
    companion are renamed into place; an error before the new file is in place puts the old
    companion back. Temporaries of killed writers of these two names are removed first.
    Returns `path`."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    remove_stale_temps(parent, names=(os.path.basename(path), os.path.basename(companion)))
    new, new_companion, old_companion = temp_name(path), temp_name(companion), temp_name(companion)
    try:
        for tmp, content in ((new, data), (new_companion, companion_data)):
            with open(tmp, "wb") as f:
                f.write(content)
            _fsync_file(tmp)
        aside = [(companion, old_companion)] if os.path.lexists(companion) else []
        rename_all([*aside, (new, path)])   # undone on an error: the old pair again
        # Once the new file is in place it stays (the old one is gone): an error here leaves it
        # without a companion, a state a reader already handles.
        os.replace(new_companion, companion)
    finally:
        for tmp in (new, new_companion, old_companion):
            with contextlib.suppress(OSError):
                os.remove(tmp)
    return path


def json_bytes(data):
    """`data` as JSON (indented, sorted keys), UTF-8."""
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False).encode("utf-8")


def write_json_atomic(path, data):
    """JSON (`json_bytes`) written atomically."""
    return write_bytes_atomic(path, json_bytes(data))


def read_json(path, default=None):
    """The JSON at `path`, or `default` when there is no such file."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return default


def make_temp_dir(parent, name=""):
    """A new hidden temporary directory in `parent` (created), to be renamed into place by the
    caller once complete (see `rename_dir_if_absent`)."""
    os.makedirs(parent, exist_ok=True)
    path = os.path.join(parent, f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}-{name}")
    os.mkdir(path)
    return path


def rename_dir_if_absent(tmp, target):
    """Renames directory `tmp` to `target` unless `target` exists with content (another writer
    won); an empty `target` is replaced. Returns True when `tmp` became `target`."""
    with contextlib.suppress(OSError):
        os.rmdir(target)  # only if empty
    try:
        os.rename(tmp, target)
        return True
    except OSError:
        if not os.path.exists(target):
            raise
        return False


def rename_all(renames):
    """Renames each `(src, dst)` of `renames` in order (os.replace). When one fails, renames those
    done back (dst to src) in reverse order and re-raises, so a writer that first moves the files it
    replaces aside (to temporary names) gets them back; should one of those fail, the ones before it
    stay undone and that error propagates (the first one as its context). A kill in between leaves
    the renames done so far."""
    done = []
    try:
        for src, dst in renames:
            os.replace(src, dst)
            done.append((src, dst))
    except BaseException:
        for src, dst in reversed(done):
            os.replace(dst, src)
        raise


def remove_stale_temps(directory, names=None):
    """Deletes the temporary files and directories in `directory` whose writing process (by the
    pid in their name) is gone on this host; a live writer's are left alone. `names`: only the
    temporaries of files with these names (a folder another host or container also writes to
    keeps theirs). Returns the count."""
    removed = 0
    try:
        entries = os.listdir(directory)
    except FileNotFoundError:
        return 0
    for entry in entries:
        m = _TMP_NAME.match(entry)
        if not m or pid_alive(int(m.group(1))):
            continue
        if names is not None and entry[m.end():].split("-", 1)[-1] not in names:
            continue
        remove_path(os.path.join(directory, entry))
        removed += 1
    return removed


LOCK_NAME = ".lock"


class Busy(Exception):
    """Another process holds the directory (see `exclusive`)."""


@contextlib.contextmanager
def exclusive(directory):
    """Holds an advisory lock on `directory/.lock` (created, with the holder's pid) for the block,
    so two processes never write one directory at once; raises `Busy`, naming the holder, when
    another process has it. The kernel releases the lock when the holder exits, however it ends
    (`kill -9` included), so a stale lock file needs no cleanup. A file system without locks runs
    the block unlocked, with a warning. On NFS the lock is as good as the mount's: with `nolock`
    or `local_lock=flock|all` it holds only against processes on the same host."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode("ascii", "replace").strip() or "unknown"
            raise Busy(f"{directory} is in use by another process ({holder})") from None
        except OSError as e:
            warnings.warn(f"cannot lock {path} ({e.strerror}); nothing stops a second process "
                          "from writing this directory at the same time", stacklevel=3)
        else:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def pid_alive(pid):
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by someone else
    return True


def _fsync_file(path):
    if os.path.isfile(path):
        with open(path, "rb") as f:
            os.fsync(f.fileno())
