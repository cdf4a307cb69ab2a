"""Download ImageNet from Kaggle and extract it safely.

    python -m keras_resnet.download --data_dir=DIR                 # download (resumes), extract
    python -m keras_resnet.download --data_dir=DIR --archive=ZIP   # extract a zip you already have

Extraction refuses absolute paths, `..` and links leading outside DIR (zip-slip / tar-slip),
writes every file to a hidden temp name and renames it (so a file that exists is complete),
and writes DIR/.keras_resnet_extracted.json only after everything is extracted and counted.
Until then DIR/.keras_resnet_extracting marks the tree as partial: training refuses it and the
next run finishes it, skipping files already there with the right size.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import stat
import sys
import tarfile
import zipfile

from absl import flags

from keras_resnet import cli
from keras_resnet.files import atomic_path, read_json, write_json_atomic
from pipelines.layout import EXTRACTING_MARKER, KAGGLE_IMAGE_ROOT, SYNSET_MAPPING, VAL_SOLUTION

COMPETITION = "imagenet-object-localization-challenge"
# Bytes to plan with: (archive, extracted tree). JPEGs barely compress, so they are about equal.
PLANNING_BYTES = {COMPETITION: (167 * 10**9, 167 * 10**9)}
EXPECTED_COUNTS = {COMPETITION: {"classes": 1000, "train": 1_281_167, "val": 50_000,
                                 "test": 100_000}}
DONE_MARKER = ".keras_resnet_extracted.json"
LOC_FILES = (SYNSET_MAPPING, "LOC_train_solution.csv", VAL_SOLUTION, "LOC_sample_submission.csv")
TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar")
KAGGLE_PARTIAL_SUFFIX = ".kaggle-partial"   # kaggle 2.x's sidecar while a download is incomplete
SPACE_MARGIN = 1.02                         # file-system block overhead
COPY_CHUNK = 1 << 20
TOKEN_URL = "https://www.kaggle.com/settings/api"
CREDENTIALS_HELP = (
    "Kaggle credentials not found: create a token at " + TOKEN_URL + " (Create New Token), save "
    "it as ~/.kaggle/kaggle.json and run chmod 600 ~/.kaggle/kaggle.json, or set KAGGLE_USERNAME "
    "and KAGGLE_KEY (or KAGGLE_API_TOKEN); or download the zip yourself and pass --archive=ZIP")



def define_flags(values):
    flags.DEFINE_string("data_dir", None, "Directory to download and extract ImageNet into.",
                        flag_values=values)
    flags.DEFINE_string("archive", None, "Extract this zip (downloaded by browser or the kaggle "
                        "CLI) instead of downloading.", flag_values=values)
    flags.DEFINE_string("competition", COMPETITION, "Kaggle competition to download.",
                        flag_values=values)
    flags.DEFINE_bool("keep_archive", False, "Keep the downloaded zip after a verified "
                      "extraction (an --archive you pass is never deleted).", flag_values=values)


class DownloadError(Exception):
    """A problem the user can fix; the message (one line) says how."""


# ---------------------------------------------------------------------------------------------
# Entry points


def fetch(data_dir: str, *, archive: str | None = None, competition: str = COMPETITION,
          keep_archive: bool = False, api_factory=None, log=print) -> dict:
    """Downloads (unless `archive`), extracts and verifies; returns the verification report.

    `api_factory()` returns an object with kaggle's `authenticate()` and
    `competition_download_files(competition, path=, force=, quiet=)`; tests pass a fake.
    """
    data_dir = os.path.abspath(os.path.expanduser(data_dir))
    os.makedirs(data_dir, exist_ok=True)
    done = read_json(os.path.join(data_dir, DONE_MARKER))
    if done is not None and not os.path.exists(os.path.join(data_dir, EXTRACTING_MARKER)):
        log(f"{data_dir} is already extracted and verified (delete {DONE_MARKER} to redo).")
        return done
    downloaded = archive is None
    if archive is None:
        archive = _download(data_dir, competition, api_factory or _kaggle_api, log)
    elif not os.path.isfile(archive):
        raise DownloadError(f"--archive={archive} does not exist: pass the path of the "
                            f"{competition}.zip you downloaded")
    archive = os.path.abspath(os.path.expanduser(archive))
    extract_archive(archive, data_dir, log=log)
    report = verify(data_dir, competition)
    report["archive"] = archive
    write_json_atomic(os.path.join(data_dir, DONE_MARKER), report)
    os.remove(os.path.join(data_dir, EXTRACTING_MARKER))
    if downloaded and not keep_archive and report.get("notes"):
        log(f"Kept {archive}: the extracted tree differs from what was expected (see the notes).")
    elif downloaded and not keep_archive:
        os.remove(archive)      # 167 GB back; only after a complete, verified extraction
        log(f"Deleted {archive} (pass --keep_archive to keep it).")
    return report


def fetch_and_print(data_dir, *, archive=None, competition=COMPETITION, keep_archive=False,
                    api_factory=None) -> int:
    """`fetch` for the command line: prints the report or a one-line error; returns exit code."""
    try:
        report = fetch(data_dir, archive=archive, competition=competition,
                       keep_archive=keep_archive, api_factory=api_factory)
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to resume", file=sys.stderr)
        return 130
    except OSError as e:  # disk full, permissions, a file where a folder belongs, I/O errors
        print(f"error: {e.strerror or e}: {e.filename or data_dir}; fix it (free space, "
              f"permissions) and run the same command again to resume", file=sys.stderr)
        return 1
    print(format_report(report))
    return 0


def main(flag_values, args):
    if not flag_values.data_dir:
        raise cli.UsageError("--data_dir is required, e.g. --data_dir=~/data/imagenet")
    return fetch_and_print(flag_values.data_dir, archive=flag_values.archive,
                           competition=flag_values.competition,
                           keep_archive=flag_values.keep_archive)


def run(argv=None):
    """The command with `argv` (without the program name; default: sys.argv); exit status."""
    return cli.run(define_flags, main, argv, prog="keras_resnet.download", doc=__doc__)


# ---------------------------------------------------------------------------------------------
# Download


def _kaggle_api():
    try:
        # Importing kaggle authenticates at once and prints its own help when that fails.
        with contextlib.redirect_stdout(io.StringIO()):
            from kaggle.api.kaggle_api_extended import KaggleApi
    except ImportError as e:
        raise DownloadError(f"the kaggle package is missing ({e.name}): pip install kaggle") \
            from None
    return KaggleApi()


def credential_file_warnings() -> list[str]:
    """Warnings for Kaggle credential files that other users can read."""
    home = os.path.expanduser("~")
    dirs = [os.environ.get("KAGGLE_CONFIG_DIR"), os.path.join(home, ".kaggle"),
            os.path.join(os.environ.get("XDG_CONFIG_HOME") or os.path.join(home, ".config"),
                         "kaggle")]
    warnings = []
    for path in dict.fromkeys(os.path.join(d, f) for d in dirs if d
                              for f in ("kaggle.json", "access_token")):
        try:
            mode = os.stat(path).st_mode
        except OSError:
            continue
        if mode & 0o077:
            warnings.append(f"warning: {path} is readable by other users (mode "
                            f"{stat.S_IMODE(mode):o}): run chmod 600 {path}")
    return warnings


def _download(data_dir, competition, api_factory, log) -> str:
    """Downloads (or resumes) `<data_dir>/<competition>.zip`; returns its path once complete.

    Before anything is downloaded, every blocking problem is found and reported in one message:
    credentials first, then the competition's rules (where the API tells), then disk space.
    """
    path = os.path.join(data_dir, competition + ".zip")
    if _download_complete(path):
        log(f"Found the complete download {path}.")
        return path
    have = os.path.getsize(path) if os.path.exists(path) else 0
    for warning in credential_file_warnings():
        print(warning, file=sys.stderr)
    problems = []
    api, problem = _authenticated_api(api_factory)
    if problem:
        problems.append(problem)
    elif _rules_accepted(api, competition) is False:
        problems.append(_rules_problem(competition))
    if competition in PLANNING_BYTES:
        archive_bytes, tree_bytes = PLANNING_BYTES[competition]
        problems.append(_space_problem(
            data_dir, archive_bytes - have + tree_bytes,
            f"the {competition} archive ({_gb(archive_bytes)}) and its extraction "
            f"({_gb(tree_bytes)})"))
    problems = [p for p in problems if p]
    if len(problems) == 1:
        raise DownloadError(problems[0])
    if problems:
        raise DownloadError(f"{len(problems)} problems stop the download; fix them all, then run "
                            "the same command again:\n" + "\n".join(
                                f"  {i}. {p}" for i, p in enumerate(problems, 1)))
    log(f"{'Resuming' if have else 'Downloading'} {competition} into {path} ...")
    try:
        api.competition_download_files(competition, path=data_dir, force=False, quiet=False)
    except Exception as e:   # kaggle raises requests/urllib3/OSError/ValueError types
        raise _download_error(e, competition) from None
    if not _download_complete(path):
        raise DownloadError(f"the download of {path} is incomplete: run the same command again "
                            "to resume it")
    return path


def _authenticated_api(api_factory):
    """(api, None) once authenticated, or (None, what to do) when it cannot be."""
    try:
        api = api_factory()
    except DownloadError as e:  # the kaggle package is missing
        return None, str(e)
    try:
        with contextlib.redirect_stdout(io.StringIO()):   # kaggle prints help we replace
            api.authenticate()
    except (SystemExit, Exception) as e:
        # Never echo the exception text: it may hold a token.
        if isinstance(e, SystemExit) or "credential" in type(e).__name__.lower():
            return None, CREDENTIALS_HELP
        return None, (f"could not authenticate with Kaggle ({type(e).__name__}): check your "
                      "connection and credentials; " + CREDENTIALS_HELP)
    return api, None


def _rules_accepted(api, competition):
    """Whether the account has accepted the competition's rules (joined it), as the API's
    competition list says; None when the API cannot tell (then a refused download says so)."""
    lister = getattr(api, "competitions_list", None)
    if lister is None:
        return None
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            response = lister(search=competition)
    except Exception:  # an older API, the network: the download itself will tell
        return None
    for item in getattr(response, "competitions", response) or []:
        ref = str(getattr(item, "ref", "") or "")
        if ref.rstrip("/").rsplit("/", 1)[-1] == competition:
            entered = getattr(item, "user_has_entered", getattr(item, "userHasEntered", None))
            return None if entered is None else bool(entered)
    return None


def _rules_problem(competition):
    url = f"https://www.kaggle.com/competitions/{competition}"
    return (f"the Kaggle account of your token has not accepted the competition's rules: accept "
            f"them on its page, {url}/rules")


def _download_complete(path) -> bool:
    """kaggle writes a partial download under the final name: check its marker and zip footer."""
    return (os.path.isfile(path) and not os.path.exists(path + KAGGLE_PARTIAL_SUFFIX)
            and zipfile.is_zipfile(path))


def _download_error(e, competition) -> DownloadError:
    status = getattr(getattr(e, "response", None), "status_code", None) or getattr(e, "status",
                                                                                   None)
    url = f"https://www.kaggle.com/competitions/{competition}"
    if status == 403:
        return DownloadError(f"Kaggle refused the download (HTTP 403): accept the competition's "
                             f"rules on its page, {url}/rules, with the account of your token, "
                             "then run the same command again")
    if status == 401:
        return DownloadError("Kaggle rejected the credentials (HTTP 401): " + CREDENTIALS_HELP)
    if status == 404:
        return DownloadError(f"competition {competition!r} not found (HTTP 404): check "
                             f"--competition (default {COMPETITION})")
    what = f"HTTP {status}" if status else type(e).__name__
    return DownloadError(f"the download failed ({what}): run the same command again to resume")


def _space_problem(directory, need_bytes, what):
    """What to do when `directory` has less than `need_bytes` free, else None."""
    free = shutil.disk_usage(directory).free
    if need_bytes * SPACE_MARGIN > free:
        return (f"not enough disk space in {directory}: {what} need about "
                f"{_gb(need_bytes * SPACE_MARGIN)} more, {_gb(free)} free; free some space or "
                "choose another --data_dir")
    return None


def _check_space(directory, need_bytes, what) -> None:
    problem = _space_problem(directory, need_bytes, what)
    if problem:
        raise DownloadError(problem)


def _gb(n) -> str:
    return f"{n / 1e9:,.1f} GB"


# ---------------------------------------------------------------------------------------------
# Safe extraction


def extract_archive(archive: str, dest: str, log=print) -> int:
    """Extracts a Kaggle zip (flat, or with the tree in a nested .tar.gz) into `dest`.

    Safe against zip-slip and tar-slip; resumable (complete files are kept). Returns the number
    of files the archive holds.
    """
    from tqdm import tqdm

    dest = os.path.realpath(dest)
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as e:
        raise DownloadError(f"{archive} is not a readable zip ({e}): download it again") from None
    with zf:
        infos = zf.infolist()
        for info in infos:    # check every name before writing anything
            _safe_target(dest, info.filename)
            if stat.S_ISLNK(info.external_attr >> 16):
                raise DownloadError(f"refusing link entry {info.filename!r} in {archive}: "
                                    "Kaggle archives hold no links")
        nested = [i for i in infos if i.filename.endswith(TAR_SUFFIXES) and not i.is_dir()]
        plain = [i for i in infos if i not in nested and not i.is_dir()]
        missing = [i for i in plain if not _complete(_safe_target(dest, i.filename), i.file_size)]
        need = sum(i.file_size for i in missing) + sum(i.file_size for i in nested)
        if nested and os.path.isdir(os.path.join(dest, "ILSVRC")):
            need -= _tree_bytes(os.path.join(dest, "ILSVRC"))     # the part already extracted
        _check_space(dest, max(0, need), f"extracting {os.path.basename(archive)}")
        _touch(os.path.join(dest, EXTRACTING_MARKER))
        count = 0
        total = sum(i.file_size for i in plain + nested)
        with tqdm(total=total, unit="B", unit_scale=True, desc="extracting", file=sys.stderr,
                  mininterval=1.0) as bar:
            for info in plain:
                target = _safe_target(dest, info.filename)
                if not _complete(target, info.file_size):
                    with zf.open(info) as src:
                        _write_atomic(src, target, archive, info.filename)
                count += 1
                bar.update(info.file_size)
            for info in nested:
                log(f"Extracting the nested {info.filename} ...")
                with zf.open(info) as raw:
                    count += _extract_tar(_Progress(raw, bar), dest, f"{archive}:{info.filename}")
    return count


class _Progress(io.RawIOBase):
    """Read-through file that advances a progress bar (for the streamed nested tar)."""

    def __init__(self, f, bar):
        self._f, self._bar = f, bar

    def readable(self):
        return True

    def readinto(self, b):
        data = self._f.read(len(b))
        b[:len(data)] = data
        self._bar.update(len(data))
        return len(data)


def _extract_tar(fileobj, dest, name) -> int:
    """Streams a tar (never seeking back, so no temp copy of a 150 GB .tar.gz) into `dest`."""
    if not hasattr(tarfile, "data_filter"):
        raise DownloadError("safe tar extraction needs Python >= 3.10.12 or 3.11.4 "
                            f"(tarfile.data_filter); this is {sys.version.split()[0]}")
    count = 0
    try:
        with tarfile.open(fileobj=io.BufferedReader(fileobj, COPY_CHUNK), mode="r|*") as tar:
            for member in tar:
                _safe_target(dest, member.name)   # data_filter would strip a leading "/"
                try:
                    # Python's "data" filter: no absolute paths, `..`, links leading outside,
                    # device files; checks against the real path, so planted symlinks are caught.
                    member = tarfile.data_filter(member, dest)
                except tarfile.FilterError as e:
                    raise DownloadError(f"refusing unsafe entry in {name}: {e}") from None
                target = _safe_target(dest, member.name)
                if member.isdir():
                    os.makedirs(target, exist_ok=True)
                    continue
                os.makedirs(os.path.dirname(target), exist_ok=True)
                if member.issym() or member.islnk():
                    if not os.path.lexists(target):
                        if member.issym():
                            os.symlink(member.linkname, target)
                        else:
                            shutil.copyfile(_safe_target(dest, member.linkname), target)
                elif member.isfile():
                    if not _complete(target, member.size):
                        _write_atomic(tar.extractfile(member), target, name, member.name)
                    count += 1
    except (tarfile.TarError, EOFError, zipfile.BadZipFile) as e:
        raise DownloadError(f"{name} is damaged ({e}): download the archive again") from None
    return count


def _safe_target(dest, name) -> str:
    """`dest/name`, or DownloadError when the name is absolute, has `..` or resolves outside."""
    parts = re.split(r"[/\\]", name)
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in parts:
        raise DownloadError(f"refusing unsafe path {name!r} in the archive (absolute or '..'): "
                            "it would write outside --data_dir; the archive is not a genuine "
                            "Kaggle download")
    target = os.path.realpath(os.path.join(dest, *[p for p in parts if p not in ("", ".")]))
    if target != dest and not target.startswith(dest + os.sep):
        raise DownloadError(f"refusing path {name!r}: it resolves to {target}, outside {dest} "
                            "(through a symlink)")
    return target


def _complete(path, size) -> bool:
    try:
        return os.stat(path).st_size == size
    except OSError:
        return False


def _write_atomic(src, target, archive, name) -> None:
    """Copies to a hidden temp file and renames: an existing target is always complete."""
    try:
        with atomic_path(target) as tmp, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, COPY_CHUNK)
    except zipfile.BadZipFile as e:     # zipfile checks each entry's CRC as it reads
        raise DownloadError(f"{archive} is damaged at {name} ({e}): download it again") from None


def _tree_bytes(root) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(dirpath, f)).st_size
    return total


# ---------------------------------------------------------------------------------------------
# Verification and report


def verify(data_dir: str, competition: str = COMPETITION) -> dict:
    """Counts classes and images per split and lists the LOC_* files present."""
    image_root = os.path.join(data_dir, KAGGLE_IMAGE_ROOT)
    if not os.path.isdir(image_root):
        raise DownloadError(f"the archive held no {KAGGLE_IMAGE_ROOT} folder: it is not the "
                            f"{COMPETITION} data")
    report = {"data_dir": data_dir, "image_root": image_root,
              "loc_files": [f for f in LOC_FILES if os.path.isfile(os.path.join(data_dir, f))]}
    mapping = os.path.join(data_dir, SYNSET_MAPPING)
    classes = None
    if os.path.isfile(mapping):
        with open(mapping) as f:
            classes = sum(1 for line in f if line.strip())
    train_dir = os.path.join(image_root, "train")
    class_dirs = _visible_dirs(train_dir)
    report["classes"] = classes if classes is not None else len(class_dirs)
    report["train_class_folders"] = len(class_dirs)
    for split in ("train", "val", "test"):
        report[split] = _count_images(os.path.join(image_root, split))
    report["notes"] = [f"{key}: {report[key]:,}, expected {want:,}"
                       for key, want in EXPECTED_COUNTS.get(competition, {}).items()
                       if report[key] != want]
    if VAL_SOLUTION not in report["loc_files"] and report["val"]:
        report["notes"].append(f"{VAL_SOLUTION} is missing: the flat val/ folder has no labels")
    return report


def format_report(report: dict) -> str:
    lines = [f"ImageNet (Kaggle layout) in {report['data_dir']}:",
             f"  classes: {report['classes']:,} ({report['train_class_folders']:,} train folders)",
             f"  train:   {report['train']:,} images",
             f"  val:     {report['val']:,} images (labels: {VAL_SOLUTION})",
             f"  test:    {report['test']:,} images (unlabelled)",
             f"  files:   {', '.join(report['loc_files']) or 'no LOC_* files'}"]
    lines += [f"  note: {note}" for note in report.get("notes", [])]
    lines.append(f"Train with: python train_main.py --dataset=imagenet "
                 f"--data_dir={report['data_dir']}")
    return "\n".join(lines)


def _visible_dirs(directory) -> list[str]:
    if not os.path.isdir(directory):
        return []
    with os.scandir(directory) as it:
        return [e.name for e in it if e.is_dir() and not e.name.startswith(".")]


def _count_images(directory) -> int:
    count = 0
    for _, dirnames, files in os.walk(directory):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        count += sum(1 for f in files if not f.startswith("."))
    return count


def _touch(path) -> None:
    with open(path, "a"):
        pass


if __name__ == "__main__":
    sys.exit(run())
