"""keras_resnet.download with a fake Kaggle API: both archive shapes, errors, slip attacks, resume."""

import io
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from types import SimpleNamespace

import pytest

from keras_resnet import download
from pipelines import sources
from tests.kaggle_tree import NESTED_TAR, make_kaggle_tree, make_kaggle_zip

SECRET = "s3cr3t-kaggle-key-0123456789"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeKaggle:
    """Stands in for kaggle.KaggleApi: 'downloads' a local zip into <path>/<competition>.zip."""

    def __init__(self, zip_path=None, *, auth_error=None, error=None, fail_first=False,
                 entered=None):
        self.zip_path, self.auth_error, self.error = zip_path, auth_error, error
        self.fail_first = fail_first      # first call stops half way, as a dropped connection
        self.entered = entered            # rules accepted, as kaggle's competition list says
        self.downloads = 0

    def competitions_list(self, search=None, **kwargs):
        """kaggle 2.x: a response whose competitions carry `ref` and `user_has_entered`."""
        if self.entered is None:
            return SimpleNamespace(competitions=[])
        return SimpleNamespace(competitions=[
            SimpleNamespace(ref=f"https://www.kaggle.com/competitions/{search}-2", user_has_entered=True),
            SimpleNamespace(ref=f"https://www.kaggle.com/competitions/{search}",
                            user_has_entered=self.entered)])

    def authenticate(self):
        if self.auth_error is not None:
            print(f"kaggle's own help text, key={SECRET}")    # must be swallowed
            raise self.auth_error

    def competition_download_files(self, competition, path=None, force=False, quiet=True):
        self.downloads += 1
        if self.error is not None:
            raise self.error
        out = os.path.join(path, competition + ".zip")
        data = open(self.zip_path, "rb").read()
        if self.fail_first and self.downloads == 1:
            # kaggle 2.x writes the partial under the final name plus a sidecar marker.
            open(out, "wb").write(data[: len(data) // 2])
            open(out + ".kaggle-partial", "w").write("{}")
            raise ConnectionError("connection reset")
        mode = "ab" if os.path.exists(out + ".kaggle-partial") else "wb"
        with open(out, mode) as f:
            f.write(data[os.path.getsize(out):] if mode == "ab" else data)
        if os.path.exists(out + ".kaggle-partial"):
            os.remove(out + ".kaggle-partial")


class HTTPError(Exception):
    def __init__(self, status):
        super().__init__(f"{status} Client Error for url https://x/?token={SECRET}")
        self.response = SimpleNamespace(status_code=status)


@pytest.fixture
def src_tree(tmp_path):
    return make_kaggle_tree(tmp_path / "src", num_classes=2, train_per_class=2, val_per_class=2,
                            image_size=32)


@pytest.fixture(autouse=True)
def no_real_credentials(monkeypatch, tmp_path):
    for var in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN", "KAGGLE_CONFIG_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "home" / ".config"))


def _files(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            path = os.path.join(dirpath, f)
            out[os.path.relpath(path, root)] = open(path, "rb").read()
    return out


def _assert_same_tree(src, dest):
    got = {k: v for k, v in _files(dest).items()
           if not os.path.basename(k).startswith(".") and not k.endswith(".zip")}
    assert got == _files(src)


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested_tar"])
def test_download_extract_verify(src_tree, tmp_path, capsys, nested):
    archive = make_kaggle_zip(src_tree["root"], tmp_path / "kaggle.zip", nested=nested)
    fake = FakeKaggle(archive)
    dest = tmp_path / "data"
    assert download.fetch_and_print(str(dest), competition="test-comp", api_factory=lambda: fake) == 0
    _assert_same_tree(src_tree["root"], dest)
    assert not (dest / "test-comp.zip").exists()          # deleted after verification
    assert (dest / download.DONE_MARKER).exists()
    assert not (dest / sources.EXTRACTING_MARKER).exists()
    out = capsys.readouterr().out
    assert "classes: 2" in out and f"train:   {src_tree['counts']['train']}" in out
    assert "val:     4" in out and "LOC_val_solution.csv" in out
    # Training reads it where it lies.
    src = sources.load_source("imagenet", str(dest))
    assert src.num_classes == 2 and src.val.num_examples == 4
    # A second run trusts the verified tree and does not download again.
    assert download.fetch_and_print(str(dest), competition="test-comp", api_factory=lambda: fake) == 0
    assert fake.downloads == 1 and "already extracted" in capsys.readouterr().out


def test_user_archive_is_extracted_and_kept(src_tree, tmp_path, capsys):
    archive = make_kaggle_zip(src_tree["root"], tmp_path / "mine.zip", nested=True)
    assert download.fetch_and_print(str(tmp_path / "data"), archive=archive) == 0
    assert os.path.exists(archive)
    _assert_same_tree(src_tree["root"], tmp_path / "data")
    # Counts differ from real ImageNet: said, not fatal.
    assert "expected 1,281,167" in capsys.readouterr().out


def test_interrupted_download_resumes(src_tree, tmp_path, capsys):
    archive = make_kaggle_zip(src_tree["root"], tmp_path / "kaggle.zip")
    fake = FakeKaggle(archive, fail_first=True)
    dest = tmp_path / "data"
    assert download.fetch_and_print(str(dest), competition="c", api_factory=lambda: fake) == 1
    assert "run the same command again to resume" in capsys.readouterr().err
    assert (dest / "c.zip").exists()        # partial kept for the resume
    assert download.fetch_and_print(str(dest), competition="c", keep_archive=True,
                        api_factory=lambda: fake) == 0
    assert (dest / "c.zip").read_bytes() == open(archive, "rb").read()
    _assert_same_tree(src_tree["root"], dest)


def test_incomplete_download_is_not_trusted(src_tree, tmp_path, capsys):
    archive = make_kaggle_zip(src_tree["root"], tmp_path / "kaggle.zip")
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(open(archive, "rb").read()[:-100])   # no zip footer
    fake = FakeKaggle(str(truncated))
    assert download.fetch_and_print(str(tmp_path / "data"), competition="c", api_factory=lambda: fake) == 1
    assert "incomplete: run the same command again" in capsys.readouterr().err


def test_missing_credentials_message(tmp_path, capsys):
    fake = FakeKaggle(auth_error=SystemExit(1))
    assert download.fetch_and_print(str(tmp_path / "d"), competition="c", api_factory=lambda: fake) == 1
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    for needle in ("~/.kaggle/kaggle.json", "KAGGLE_USERNAME", "KAGGLE_KEY",
                   download.TOKEN_URL, "--archive"):
        assert needle in err
    assert SECRET not in captured.out + captured.err


def test_missing_credentials_with_the_real_kaggle_package(tmp_path):
    pytest.importorskip("kaggle.api.kaggle_api_extended")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAGGLE_")}
    env.update(HOME=str(tmp_path), KAGGLE_CONFIG_DIR=str(tmp_path / "kaggle"),
               PYTHONPATH=REPO)
    proc = subprocess.run(
        [sys.executable, "-m", "keras_resnet.download", f"--data_dir={tmp_path / 'd'}",
         "--competition=no-such-comp"], env=env, capture_output=True, text=True, timeout=120,
        cwd=REPO)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "kaggle.json" in proc.stderr
    assert "Authentication required" not in proc.stdout     # kaggle's own help is replaced


def test_rules_not_accepted_403(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", SECRET)
    fake = FakeKaggle(error=HTTPError(403))
    assert download.fetch_and_print(str(tmp_path / "d"), competition="c", api_factory=lambda: fake) == 1
    captured = capsys.readouterr()
    assert "accept the competition's rules" in captured.err
    assert "https://www.kaggle.com/competitions/c/rules" in captured.err
    assert SECRET not in captured.out + captured.err


def test_credentials_never_printed(src_tree, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", SECRET)
    archive = make_kaggle_zip(src_tree["root"], tmp_path / "kaggle.zip")
    fakes = [FakeKaggle(archive), FakeKaggle(error=HTTPError(500)),
             FakeKaggle(auth_error=ValueError(f"bad key {SECRET}")),
             FakeKaggle(error=OSError(f"failed at https://x/?sig={SECRET}"))]
    for i, fake in enumerate(fakes):
        download.fetch_and_print(str(tmp_path / f"d{i}"), competition="c", api_factory=lambda f=fake: f)
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err


def test_world_readable_kaggle_json_warns(src_tree, tmp_path, capsys, monkeypatch):
    config = tmp_path / "kcfg"
    config.mkdir()
    (config / "kaggle.json").write_text('{"username": "someone", "key": "%s"}' % SECRET)
    os.chmod(config / "kaggle.json", 0o644)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(config))
    archive = make_kaggle_zip(src_tree["root"], tmp_path / "kaggle.zip")
    assert download.fetch_and_print(str(tmp_path / "d"), competition="c",
                        api_factory=lambda: FakeKaggle(archive)) == 0
    captured = capsys.readouterr()
    assert f"{config / 'kaggle.json'} is readable by other users" in captured.err
    assert "chmod 600" in captured.err and SECRET not in captured.out + captured.err
    os.chmod(config / "kaggle.json", 0o600)
    assert download.credential_file_warnings() == []


def test_disk_space_checked_before_starting(src_tree, tmp_path, capsys, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=10**9))
    fake = FakeKaggle(make_kaggle_zip(src_tree["root"], tmp_path / "k.zip"))
    assert download.fetch_and_print(str(tmp_path / "d")) == 1     # the real competition: ~334 GB needed
    assert fake.downloads == 0
    err = capsys.readouterr().err
    assert "not enough disk space" in err and "1.0 GB free" in err
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1000))
    assert download.fetch_and_print(str(tmp_path / "d2"), archive=str(tmp_path / "k.zip")) == 1
    assert "not enough disk space" in capsys.readouterr().err
    assert not (tmp_path / "d2" / "ILSVRC").exists()


def test_every_blocking_problem_is_reported_at_once(tmp_path, capsys, monkeypatch):
    """No credentials and too little disk: one message lists both, credentials first."""
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=63 * 10**9))
    fake = FakeKaggle(auth_error=SystemExit(1))
    assert download.fetch_and_print(str(tmp_path / "d"), api_factory=lambda: fake) == 1
    err = capsys.readouterr().err
    assert "2 problems stop the download" in err and fake.downloads == 0
    first, second = err.index("1. Kaggle credentials not found"), err.index("2. not enough disk")
    assert first < second and "63.0 GB free" in err
    assert SECRET not in err


def test_rules_not_accepted_is_found_before_downloading(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", SECRET)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=10**9))
    fake = FakeKaggle(entered=False)
    assert download.fetch_and_print(str(tmp_path / "d"), api_factory=lambda: fake) == 1
    err = capsys.readouterr().err
    assert fake.downloads == 0 and "2 problems" in err
    assert "1. the Kaggle account of your token has not accepted the competition's rules" in err
    assert f"competitions/{download.COMPETITION}/rules" in err and "2. not enough disk" in err


def test_accepted_rules_and_space_let_the_download_start(src_tree, tmp_path, monkeypatch):
    archive = make_kaggle_zip(src_tree["root"], tmp_path / "kaggle.zip")
    fake = FakeKaggle(archive, entered=True)
    assert download.fetch_and_print(str(tmp_path / "d"), competition="c", api_factory=lambda: fake) == 0
    assert fake.downloads == 1


def _zip_with(path, entries):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return str(path)


def _outside_untouched(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir())


@pytest.mark.parametrize("name", ["../evil.txt", "/tmp/evil_abs.txt", "ILSVRC/../../evil.txt",
                                  "C:/evil.txt", "..\\evil.txt"])
def test_zip_slip_refused(tmp_path, capsys, name):
    archive = _zip_with(tmp_path / "bad.zip", [("LOC_synset_mapping.txt", "n1 a\n"),
                                               (name, "pwned")])
    before = _outside_untouched(tmp_path)
    assert download.fetch_and_print(str(tmp_path / "d"), archive=archive) == 1
    assert "refusing unsafe path" in capsys.readouterr().err
    assert _outside_untouched(tmp_path) == sorted(before + ["d"])
    assert os.listdir(tmp_path / "d") == []             # names are checked before any write
    assert not os.path.exists("/tmp/evil_abs.txt")


def test_zip_symlink_entry_refused(tmp_path, capsys):
    info = zipfile.ZipInfo("ILSVRC/link")
    info.external_attr = (0o120777 << 16)
    with zipfile.ZipFile(tmp_path / "bad.zip", "w") as zf:
        zf.writestr(info, "/etc")
    assert download.fetch_and_print(str(tmp_path / "d"), archive=str(tmp_path / "bad.zip")) == 1
    assert "refusing link entry" in capsys.readouterr().err


def test_symlink_planted_in_data_dir_is_not_followed(tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "d").mkdir()
    os.symlink(outside, tmp_path / "d" / "ILSVRC")
    archive = _zip_with(tmp_path / "a.zip", [("ILSVRC/x.JPEG", "data")])
    assert download.fetch_and_print(str(tmp_path / "d"), archive=archive) == 1
    assert "outside" in capsys.readouterr().err and os.listdir(outside) == []


def _tar_member(tar, name, data=b"x", **attrs):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in attrs.items():
        setattr(info, k, v)
    tar.addfile(info, io.BytesIO(data) if info.isfile() else None)


@pytest.mark.parametrize("attack", ["dotdot", "absolute", "symlink_out", "symlink_abs",
                                    "hardlink_out"])
def test_tar_slip_refused(tmp_path, capsys, attack):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        _tar_member(tar, "ILSVRC/ok.JPEG")
        if attack == "dotdot":
            _tar_member(tar, "ILSVRC/../../evil.txt")
        elif attack == "absolute":
            _tar_member(tar, str(tmp_path / "evil.txt"))
        elif attack == "symlink_out":
            _tar_member(tar, "ILSVRC/link", b"", type=tarfile.SYMTYPE, linkname="../../")
            _tar_member(tar, "ILSVRC/link/evil.txt")
        elif attack == "symlink_abs":
            _tar_member(tar, "ILSVRC/link", b"", type=tarfile.SYMTYPE, linkname=str(tmp_path))
            _tar_member(tar, "ILSVRC/link/evil.txt")
        else:
            _tar_member(tar, "ILSVRC/hard", b"", type=tarfile.LNKTYPE, linkname="../../bad.zip")
    archive = _zip_with(tmp_path / "bad.zip", [(NESTED_TAR, buf.getvalue())])
    before = _outside_untouched(tmp_path)
    assert download.fetch_and_print(str(tmp_path / "d"), archive=archive) == 1
    err = capsys.readouterr().err
    assert "refusing unsafe" in err and "Traceback" not in err
    assert _outside_untouched(tmp_path) == sorted(before + ["d"])
    assert not os.path.lexists(tmp_path / "d" / "ILSVRC" / "link")


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested_tar"])
def test_partial_extraction_is_finished_on_rerun(src_tree, tmp_path, capsys, monkeypatch,
                                                 nested):
    archive = make_kaggle_zip(src_tree["root"], tmp_path / "k.zip", nested=nested)
    dest = tmp_path / "d"
    real_write = download._write_atomic
    written = []

    def write_then_die(src, target, *args):
        if len(written) == 5:
            raise KeyboardInterrupt     # Ctrl-C or a kill half way through
        written.append(target)
        real_write(src, target, *args)

    monkeypatch.setattr(download, "_write_atomic", write_then_die)
    assert download.fetch_and_print(str(dest), archive=archive) == 130
    assert (dest / sources.EXTRACTING_MARKER).exists()
    assert not (dest / download.DONE_MARKER).exists()
    if (dest / "ILSVRC").exists():
        with pytest.raises(sources.DataError, match="did not finish"):
            sources.load_source("imagenet", str(dest))
    # Damage one finished file as well: a size mismatch must be re-extracted.
    with open(written[0], "r+b") as f:
        f.truncate(1)
    monkeypatch.setattr(download, "_write_atomic", real_write)
    capsys.readouterr()
    assert download.fetch_and_print(str(dest), archive=archive) == 0
    _assert_same_tree(src_tree["root"], dest)
    assert not (dest / sources.EXTRACTING_MARKER).exists()
    assert sources.load_source("imagenet", str(dest)).val.num_examples == 4
