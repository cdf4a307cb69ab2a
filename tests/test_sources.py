"""pipelines.sources on tiny trees in the Kaggle and ImageFolder layouts, TFDS mocks and the demo."""

import json
import os
import shutil

import numpy as np
import pytest

from pipelines import demo, sources
from pipelines.sources import DataError, load_source
from tests.kaggle_tree import BROKEN_REASONS, make_kaggle_tree


@pytest.fixture
def tree(tmp_path):
    return make_kaggle_tree(tmp_path / "imagenet")


def _as_dict(split):
    return dict(zip(split.files.tolist(), split.labels.tolist(), strict=True))


def test_kaggle_layout_labels_classes_and_broken_files(tree):
    src = load_source("imagenet", tree["root"])
    assert src.layout == "kaggle"
    assert src.class_ids == tree["class_ids"] == sorted(tree["class_ids"])
    assert src.class_names == tree["class_names"]
    assert src.num_classes == 3     # never 1001, labels 0-based
    assert _as_dict(src.train) == tree["train"]          # CMYK and PNG-named-.JPEG kept
    assert _as_dict(src.val) == tree["val"]              # first wnid of unsorted multi-box rows
    assert src.train.labels.dtype == np.int64 and src.val.labels.min() == 0
    assert list(src.train.files) == sorted(src.train.files)
    assert all(os.path.isabs(f) for f in src.train.files)
    assert src.train.num_examples == len(tree["train"]) and src.val.num_examples == 6
    skipped = dict(src.skipped)
    assert set(skipped) == set(tree["broken"])
    for path, reason in tree["broken"].items():
        assert reason in skipped[path]
    assert "train 14" in src.summary() and "left out 3 files" in src.summary()


def test_data_dir_may_be_any_level_down_to_cls_loc(tree):
    for level in ("ILSVRC", os.path.join("ILSVRC", "Data"), os.path.join("ILSVRC", "Data",
                                                                         "CLS-LOC")):
        src = load_source("imagenet", os.path.join(tree["root"], level))
        assert src.root == tree["image_root"], level
        assert src.class_names == tree["class_names"]       # LOC files found at the Kaggle root
        assert _as_dict(src.val) == tree["val"]


def test_imagefolder_layout_after_valprep(tree, tmp_path):
    # What valprep.sh produces: val/<wnid>/*.JPEG; no LOC_* files next to it.
    folder = tmp_path / "folder"
    shutil.copytree(tree["image_root"], folder)
    for path, label in tree["val"].items():
        class_dir = folder / "val" / tree["class_ids"][label]
        class_dir.mkdir(exist_ok=True)
        os.rename(folder / "val" / os.path.basename(path), class_dir / os.path.basename(path))
    (folder / "val" / "README.txt").write_text("a stray file next to the class folders")
    src = load_source("imagenet", str(folder))
    assert src.layout == "imagefolder"
    assert dict(src.skipped)[str(folder / "val" / "README.txt")] == "file outside class folders"
    assert src.class_ids == src.class_names == tree["class_ids"]
    want_val = {os.path.join(folder, "val", tree["class_ids"][lb], os.path.basename(p)): lb
                for p, lb in tree["val"].items()}
    assert _as_dict(src.val) == want_val
    assert len(src.train.files) == len(tree["train"])
    # An empty class folder stays a class (its output exists) but is reported.
    (folder / "train" / "n99999999").mkdir()
    src = load_source("imagenet", str(folder))
    assert src.class_ids == tree["class_ids"] + ["n99999999"]
    assert dict(src.skipped)[str(folder / "train" / "n99999999")] == "class has no training images"


def test_imagefolder_class_folders_with_sub_folders(tmp_path):
    # As torchvision's ImageFolder: train/<class>/<any sub-folder>/<file> belongs to <class>.
    from tests.kaggle_tree import image_bytes

    rng = np.random.default_rng(0)
    root = tmp_path / "folder"
    expected = {}
    for label, name in enumerate(["bird", "cat"]):
        for rel in ("a.jpg", "2019/b.jpg", "2019/05/c.png"):
            path = root / "train" / name / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(image_bytes(rng, 32, fmt="PNG" if rel.endswith("png") else "JPEG"))
            expected[str(path)] = label
    (root / "train" / "cat" / "2019" / "up").symlink_to(root / "train")  # a loop: not followed
    src = load_source("imagenet", str(root))
    assert src.class_ids == ["bird", "cat"] and _as_dict(src.train) == expected
    # A file added two levels down changes no mtime the key holds; the index notices it anyway.
    new = root / "train" / "bird" / "2019" / "05" / "d.jpg"
    new.write_bytes(image_bytes(rng, 32))
    assert _as_dict(load_source("imagenet", str(root)).train) == {**expected, str(new): 0}


def test_names_that_are_not_utf8_and_dangling_links_are_skipped_and_reported(tmp_path):
    # TensorFlow cannot take such a name as a string: training and prepare crashed on it.
    from tests.kaggle_tree import image_bytes

    rng = np.random.default_rng(0)
    root = tmp_path / "folder"
    for name in ("bird", "cat"):
        (root / "train" / name).mkdir(parents=True)
        (root / "train" / name / "ok.jpg").write_bytes(image_bytes(rng, 32))
    raw = os.fsencode(root / "train")
    with open(raw + b"/cat/caf\xe9.jpg", "wb") as f:  # Latin-1, as an old Windows zip names it
        f.write(image_bytes(rng, 32))
    os.makedirs(raw + b"/d\xe9j\xe0")
    with open(raw + b"/d\xe9j\xe0/x.jpg", "wb") as f:
        f.write(image_bytes(rng, 32))
    (root / "train" / "bird" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (root / "train" / "loose.jpg").symlink_to(tmp_path / "nowhere.jpg")  # beside the classes
    for _ in range(2):  # built, then read from the cached index
        src = load_source("imagenet", str(root))
        assert src.class_ids == ["bird", "cat"] and src.train.num_examples == 2
        reasons = dict(src.skipped)
        assert reasons[str(root / "train" / "cat" / "caf\ufffd.jpg")] == \
            "name is not UTF-8: rename it"
        assert reasons[str(root / "train" / "d\ufffdj\ufffd")] == "name is not UTF-8: rename it"
        for link in (root / "train" / "bird" / "gone.jpg", root / "train" / "loose.jpg"):
            assert reasons[str(link)] == "link to a file that does not exist"


def test_a_flat_val_reports_each_absent_image_once(tree, tmp_path):
    """In the flat Kaggle val/, an image replaced by a link to nothing (under any extension) is
    reported as that link only; a deleted one as missing."""
    val_dir = os.path.join(tree["image_root"], "val")
    linked, deleted = sorted(tree["val"])[:2]
    os.remove(linked)
    os.remove(deleted)
    link = os.path.splitext(linked)[0] + ".jpg"
    os.symlink(tmp_path / "nowhere.jpg", link)
    src = load_source("imagenet", tree["root"])
    reports = [(path, reason) for path, reason in src.skipped if path.startswith(val_dir)]
    assert sorted(reports) == sorted([(link, "link to a file that does not exist"),
                                      (deleted, "missing (listed in LOC_val_solution.csv)")])
    assert src.val.num_examples == len(tree["val"]) - 2


def test_index_is_cached_and_invalidated_when_the_tree_changes(tree, monkeypatch):
    first = load_source("imagenet", tree["root"])
    assert os.path.isfile(os.path.join(tree["root"], sources.INDEX_FILE))
    real_build = sources._build_index

    def no_build(*args, **kwargs):
        raise AssertionError("index rebuilt although the tree did not change")

    monkeypatch.setattr(sources, "_build_index", no_build)
    again = load_source("imagenet", tree["root"])
    assert _as_dict(again.train) == _as_dict(first.train) and again.skipped == first.skipped
    # Adding a file changes its class folder's mtime: the index must be rebuilt.
    new = os.path.join(tree["image_root"], "train", tree["class_ids"][1], "new.JPEG")
    shutil.copy(next(iter(tree["val"])), new)
    with pytest.raises(AssertionError, match="rebuilt"):
        load_source("imagenet", tree["root"])
    monkeypatch.setattr(sources, "_build_index", real_build)
    assert _as_dict(load_source("imagenet", tree["root"]).train)[new] == 1


def test_read_only_data_dir_caches_elsewhere(tree, tmp_path):
    # A directory where the index file should go makes that write fail (works even as root).
    os.mkdir(os.path.join(tree["root"], sources.INDEX_FILE))
    cache = tmp_path / "cache"
    src = load_source("imagenet", tree["root"], cache_dir=str(cache))
    assert len(os.listdir(cache)) == 1
    assert _as_dict(load_source("imagenet", tree["root"], cache_dir=str(cache)).val) == \
        _as_dict(src.val)


def test_index_is_not_written_when_asked_not_to(tree, tmp_path):
    """Non-chief workers of a multi-worker run read a cached index but never write one."""
    cache = tmp_path / "cache"
    src = load_source("imagenet", tree["root"], cache_dir=str(cache), write_index=False)
    assert src.train.num_examples == len(tree["train"])
    assert not os.path.exists(os.path.join(tree["root"], sources.INDEX_FILE))
    assert not cache.exists() or not os.listdir(cache)
    load_source("imagenet", tree["root"], cache_dir=str(cache))  # the chief writes it
    assert os.path.isfile(os.path.join(tree["root"], sources.INDEX_FILE))


def test_missing_data_says_what_to_do(tmp_path):
    for data_dir in (tmp_path / "absent", tmp_path):
        with pytest.raises(DataError, match=r"keras_resnet.download --data_dir=.*--dataset=demo"):
            load_source("imagenet", str(data_dir))
    with pytest.raises(DataError, match="unknown dataset 'imagenet21k'"):
        load_source("imagenet21k", str(tmp_path))


def test_flat_val_without_solution_csv_is_an_error(tree):
    os.remove(os.path.join(tree["root"], "LOC_val_solution.csv"))
    with pytest.raises(DataError, match="LOC_val_solution.csv is missing"):
        load_source("imagenet", tree["root"])


def test_label_files_written_by_other_tools_read_the_same(tree):
    # Other datasets in the Kaggle layout: a mapping and CSV saved with a byte-order mark and CRLF
    # (Windows), the mapping tab-separated, the CSV's ImageIds written as file names.
    mapping = os.path.join(tree["root"], "LOC_synset_mapping.txt")
    solution = os.path.join(tree["root"], "LOC_val_solution.csv")
    lines = open(mapping, encoding="utf-8").read().splitlines()
    with open(mapping, "w", encoding="utf-8-sig", newline="\r\n") as f:
        f.write("".join(line.replace(" ", "\t", 1) + "\n" for line in lines))
    header, *rows = open(solution, encoding="utf-8").read().splitlines()
    with open(solution, "w", encoding="utf-8-sig", newline="\r\n") as f:
        f.write("".join(row + "\n" for row in [header] + [
            row.replace(",", ".JPEG,", 1) for row in rows]))
    src = load_source("imagenet", tree["root"])
    assert src.class_ids == tree["class_ids"] and src.class_names == tree["class_names"]
    assert _as_dict(src.val) == tree["val"] and _as_dict(src.train) == tree["train"]


def test_flat_val_that_no_csv_row_names_is_an_error(tree):
    # The wrong CSV (or another naming scheme): not an empty validation split without a word.
    solution = os.path.join(tree["root"], "LOC_val_solution.csv")
    header, *rows = open(solution).read().splitlines()
    with open(solution, "w") as f:
        f.write("\n".join([header] + ["other_" + row for row in rows]) + "\n")
    with pytest.raises(DataError, match=r"none of the 6 files in .*val has a row in .*"
                                        r"\(files like 'ILSVRC2012_val_\d+.JPEG', ImageIds like "
                                        r"'other_ILSVRC2012_val_\d+'\)") as error:
        load_source("imagenet", tree["root"])
    assert "\n" not in str(error.value)


def test_val_csv_whose_labels_are_all_unknown_is_an_error(tree):
    solution = os.path.join(tree["root"], "LOC_val_solution.csv")
    header, *rows = open(solution).read().splitlines()
    with open(solution, "w") as f:  # every row names a file, every label another dataset's
        f.write("\n".join([header] + [row.replace(",n", ",x", 1) for row in rows]) + "\n")
    with pytest.raises(DataError, match=r"none of the 6 files in .*val has a label that "
                                        r"LOC_synset_mapping.txt lists \(labels like 'x\d+'\)"):
        load_source("imagenet", tree["root"])


def _image_folder(root, splits, classes, rng):
    from tests.kaggle_tree import image_bytes

    for split in splits:
        for name in classes:
            (root / split / name).mkdir(parents=True)
            (root / split / name / "1.jpg").write_bytes(image_bytes(rng, 32))


def test_valid_or_validation_folder_is_the_validation_split(tmp_path):
    rng = np.random.default_rng(0)
    for val_dir in ("valid", "validation"):
        root = tmp_path / val_dir
        _image_folder(root, ("train", val_dir), ("bird", "cat"), rng)
        src = load_source("imagenet", str(root))
        assert _as_dict(src.val) == {str(root / val_dir / c / "1.jpg"): i
                                     for i, c in enumerate(("bird", "cat"))}
    _image_folder(tmp_path / "both", ("train", "val", "valid"), ("bird", "cat"), rng)
    assert all("/val/" in f for f in load_source("imagenet", str(tmp_path / "both")).val.files)


def test_tab_separated_mapping_names_class_ids_with_spaces(tmp_path):
    rng = np.random.default_rng(0)
    _image_folder(tmp_path, ("train",), ("sea lion", "seal"), rng)
    (tmp_path / "LOC_synset_mapping.txt").write_text("sea lion\tSea lion, big\nseal\tSeal\n")
    src = load_source("imagenet", str(tmp_path))
    assert (src.class_ids, src.class_names) == (["sea lion", "seal"], ["Sea lion, big", "Seal"])
    assert src.train.num_examples == 2 and src.layout == "kaggle"
    # Space-separated, one name holding a tab: the id is still the first word.
    (tmp_path / "LOC_synset_mapping.txt").write_text("sea lion\tSea lion\nseal Seal\n")
    os.rename(tmp_path / "train" / "sea lion", tmp_path / "train" / "sea")
    src = load_source("imagenet", str(tmp_path))
    assert (src.class_ids, src.class_names) == (["sea", "seal"], ["lion\tSea lion", "Seal"])
    # Tab-separated with one id-only line whose id holds a space: the id stays whole.
    os.rename(tmp_path / "train" / "sea", tmp_path / "train" / "sea lion")
    _image_folder(tmp_path, ("train",), ("walrus",), rng)
    (tmp_path / "LOC_synset_mapping.txt").write_text("sea lion\nseal\tSeal\nwalrus\tWalrus, big\n")
    src = load_source("imagenet", str(tmp_path))
    assert (src.class_ids, src.class_names) == (["sea lion", "seal", "walrus"],
                                                ["sea lion", "Seal", "Walrus, big"])


def test_image_folder_three_levels_below_label_files_is_not_labelled_by_them(tmp_path):
    (tmp_path / "LOC_synset_mapping.txt").write_text("n01 tench\n")
    root = tmp_path / "a" / "b" / "c"
    _image_folder(root, ("train",), ("bird", "cat"), np.random.default_rng(0))
    src = load_source("imagenet", str(root))
    assert (src.layout, src.class_ids) == ("imagefolder", ["bird", "cat"])


def test_screen_file(tree, tmp_path):
    assert sources.screen_file(tree["cmyk"]) == ""
    assert sources.screen_file(tree["png"]) == ""
    for path, reason in tree["broken"].items():
        assert reason in sources.screen_file(path)
    assert "unreadable" in sources.screen_file(str(tmp_path / "nope.JPEG"))
    # Every format the decoder reads is kept; others are named.
    for name, data, want in (("gif", b"GIF89a" + b"\0" * 20, ""),
                             ("webp", b"RIFF\x10\0\0\0WEBPVP8 " + b"\0" * 20, ""),
                             # An extended header: still (flags 0x10, alpha) or animated (0x02).
                             ("still", b"RIFF\x10\0\0\0WEBPVP8X\n\0\0\0\x10" + b"\0" * 20, ""),
                             ("animated", b"RIFF\x10\0\0\0WEBPVP8X\n\0\0\0\x12" + b"\0" * 20,
                              "animated WebP (TensorFlow decodes still images only"),
                             ("wav", b"RIFF\x10\0\0\0WAVEfmt " + b"\0" * 20, "RIFF (not WebP)"),
                             ("tiff", b"II*\x00" + b"\0" * 20, "unsupported image format TIFF"),
                             ("png", b"\x89PNG\r\n\x1a\n" + b"\0" * 20, "truncated PNG")):
        path = tmp_path / f"{name}.JPEG"
        path.write_bytes(data)
        assert (want in sources.screen_file(str(path))) if want else (
            sources.screen_file(str(path)) == ""), name
    assert set(BROKEN_REASONS.values()) == set(tree["broken"].values())


def test_decode_check_finds_corrupt_files_the_header_check_keeps(tree, capsys):
    # JPEG signature and end marker, garbage between: passes the header check, fails to decode.
    class_dir = os.path.join(tree["image_root"], "train", tree["class_ids"][0])
    corrupt = os.path.join(class_dir, "corrupt.JPEG")
    with open(corrupt, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8 + b"\xff\xd9")
    assert sources.screen_file(corrupt) == ""
    reason = sources.screen_file(corrupt, decode=True)
    assert reason.startswith("cannot be decoded: ") and len(reason) > len("cannot be decoded: ")
    assert not any(noise in reason for noise in ("[Op:", "{{", "name:")), reason

    header = load_source("imagenet", tree["root"])
    assert corrupt in header.train.files.tolist()
    decoded = load_source("imagenet", tree["root"], screen="decode")  # its own cached index
    assert corrupt not in decoded.train.files.tolist()
    assert dict(decoded.skipped)[corrupt].startswith("cannot be decoded")
    # Every readable image, CMYK and PNG-named-.JPEG included, survives the decode check.
    assert _as_dict(decoded.train) == tree["train"] and _as_dict(decoded.val) == tree["val"]
    assert "decoding train images" in capsys.readouterr().err  # progress
    with pytest.raises(ValueError, match="screen='full'; valid: header, decode, none"):
        load_source("imagenet", tree["root"], screen="full")


def test_write_skipped_report(tree, tmp_path):
    src = load_source("imagenet", tree["root"])
    path = sources.write_skipped_report(src, str(tmp_path / "model"))
    lines = open(path).read().splitlines()
    assert lines[0] == "path\treason" and len(lines) == 1 + len(tree["broken"])
    assert any(line.startswith(tree["cmyk"]) for line in lines) is False


def test_synthetic_has_classes_but_no_files():
    src = load_source("synthetic", "")
    assert src.num_classes == 1000 and src.train is None and src.val is None
    assert load_source("synthetic:10", "").num_classes == 10
    with pytest.raises(DataError, match="synthetic:N"):
        load_source("synthetic:x", "")


def _tiny_tfds_builder(tfds):
    """A registered two-split image dataset, defined once (TFDS registers builders by name)."""
    if "kr_tiny_images" in tfds.list_builders(with_community_datasets=False):
        return

    class KrTinyImages(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self, supervised_keys=("picture", "kind"),
                features=tfds.features.FeaturesDict({
                    "picture": tfds.features.Image(shape=(8, 8, 3)),
                    "kind": tfds.features.ClassLabel(names=["cat", "dog", "fish"])}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(6), "validation": self._generate_examples(3)}

        def _generate_examples(self, n):
            for i in range(n):
                yield i, {"picture": np.full((8, 8, 3), i, np.uint8), "kind": i % 3}


def test_tfds_yields_encoded_bytes_and_int64_labels(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    # tensorflow-datasets 4.9 needs it to prepare any dataset but declares it only for py<3.9.
    pytest.importorskip("importlib_resources")
    _tiny_tfds_builder(tfds)
    src = load_source("tfds:kr_tiny_images", str(tmp_path))    # prepares it (no download)
    assert src.layout == "tfds" and src.class_ids == ["cat", "dog", "fish"]
    assert src.train.files is None and src.train.num_examples == 6
    assert src.val.num_examples == 3        # "validation" preferred over "test"
    pairs = [(img.numpy(), int(lb)) for img, lb in src.train.records()]
    assert all(img[:4] == b"\x89PNG" for img, _ in pairs)     # still encoded: SkipDecoding
    assert sorted(lb for _, lb in pairs) == [0, 0, 1, 1, 2, 2]
    assert next(iter(src.val.records()))[1].dtype.name == "int64"

    # The same through tfds.testing.mock_data (metadata from tmp_path, examples made up).
    with tfds.testing.mock_data(num_examples=2, data_dir=str(tmp_path)):
        src = load_source("tfds:kr_tiny_images", str(tmp_path))
        image, label = next(iter(src.train.records()))
        assert image.dtype.name == "string" and label.dtype.name == "int64"
        assert int(label) in (0, 1, 2)


def test_tfds_unknown_dataset_is_a_data_error(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(DataError, match="tfds:no_such_dataset_xyz"):
        load_source("tfds:no_such_dataset_xyz", str(tmp_path))


def test_demo_is_kaggle_layout_deterministic_and_idempotent(tmp_path):
    kw = dict(num_classes=4, train_per_class=3, val_per_class=2, image_size=32)
    a = demo.make_demo(str(tmp_path / "a"), **kw)
    b = demo.make_demo(str(tmp_path / "b"), **kw)
    src = load_source("imagenet", a)
    assert src.layout == "kaggle" and src.num_classes == 4 and not src.skipped
    assert src.train.num_examples == 12 and src.val.num_examples == 8
    for fa in src.train.files:
        with open(fa, "rb") as f1, open(fa.replace(a, b), "rb") as f2:
            assert f1.read() == f2.read()
    mtime = os.stat(os.path.join(a, demo.MARKER)).st_mtime_ns
    assert demo.make_demo(a, **kw) == a
    assert os.stat(os.path.join(a, demo.MARKER)).st_mtime_ns == mtime
    rows = open(os.path.join(a, "LOC_val_solution.csv")).read().splitlines()[1:]
    assert rows != sorted(rows) and max(len(r.split()) for r in rows) > 5   # several boxes
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_demo_of_an_earlier_version_is_rebuilt_with_the_same_training_images(tmp_path, capsys):
    kw = dict(num_classes=3, train_per_class=2, image_size=32)
    root = demo.make_demo(str(tmp_path / "demo"), val_per_class=1, **kw)
    marker = os.path.join(root, demo.MARKER)
    meta = json.load(open(marker))
    json.dump({**meta, "version": 1}, open(marker, "w"))     # as the 250-image demo wrote it
    train = load_source("imagenet", root).train
    before = {f: open(f, "rb").read() for f in train.files}
    assert demo.make_demo(root, val_per_class=4, **kw) == root
    assert "version 1; rebuilding it as version 2" in capsys.readouterr().err
    assert json.load(open(marker))["version"] == demo.DEMO_VERSION
    src = load_source("imagenet", root)   # re-indexed: the tree is new
    assert src.val.num_examples == 12
    assert {f: open(f, "rb").read() for f in src.train.files} == before
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]
    assert demo.make_demo(root, val_per_class=4, **kw) == root and not capsys.readouterr().err


def test_demo_rebuilt_by_another_process_meanwhile_is_left_alone(tmp_path, monkeypatch):
    kw = dict(num_classes=2, train_per_class=1, val_per_class=1, image_size=32)
    root = demo.make_demo(str(tmp_path / "demo"), **kw)
    marker = os.path.join(root, demo.MARKER)
    json.dump({**json.load(open(marker)), "version": 1}, open(marker, "w"))
    write_tree = demo._write_tree

    def and_another_process_finishes(out, *args):
        write_tree(out, *args)
        json.dump({"version": demo.DEMO_VERSION}, open(marker, "w"))   # its rebuild, done
        open(os.path.join(root, "theirs"), "w").close()

    monkeypatch.setattr(demo, "_write_tree", and_another_process_finishes)
    assert demo.make_demo(root, **kw) == root
    assert os.path.exists(os.path.join(root, "theirs"))        # their tree stays in place
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_demo_of_a_newer_version_or_on_a_read_only_disk_is_used_as_it_is(tmp_path, monkeypatch,
                                                                          capsys):
    kw = dict(num_classes=2, train_per_class=1, val_per_class=1, image_size=32)
    root = demo.make_demo(str(tmp_path / "demo"), **kw)
    marker = os.path.join(root, demo.MARKER)
    meta = json.load(open(marker))
    monkeypatch.setattr(demo, "make_temp_dir", lambda *a: (_ for _ in ()).throw(
        PermissionError("read-only")))
    for version in (demo.DEMO_VERSION + 1, 1):
        json.dump({**meta, "version": version}, open(marker, "w"))
        assert demo.make_demo(root, **kw) == root
        assert json.load(open(marker))["version"] == version
        err = capsys.readouterr().err
        if version == 1:
            assert "cannot rebuild it (read-only); using version 1 as it is" in err
        else:   # not even tried
            assert err == ""
    with pytest.raises(DataError, match="cannot create the demo dataset in .*read-only.*writable"):
        demo.make_demo(str(tmp_path / "new"), **kw)


def test_demo_refuses_a_foreign_dir_and_clears_stale_builds(tmp_path):
    foreign = tmp_path / "data"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("x")
    with pytest.raises(DataError, match="not a demo dataset"):
        demo.make_demo(str(foreign))
    stale = tmp_path / ".tmp-999999999-abc-demo"   # a build whose process died
    stale.mkdir()
    demo.make_demo(str(tmp_path / "demo"), num_classes=2, train_per_class=1, val_per_class=1)
    assert not stale.exists() and (foreign / "precious.txt").exists()


def test_load_source_demo_makes_it_on_first_use(tmp_path):
    src = load_source("demo", str(tmp_path / "demo"))
    assert src.name == "demo" and src.num_classes == 10
    assert src.train.num_examples == 1200 and src.val.num_examples == 2000 and not src.skipped
    assert np.bincount(src.val.labels).min() > 0


def test_jpeg_with_trailing_bytes_after_the_end_marker_is_kept(tmp_path):
    """Some JPEGs carry padding after the EOI marker; they decode fine and must not be dropped."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buf, format="JPEG")
    padded = tmp_path / "padded.JPEG"
    padded.write_bytes(buf.getvalue() + b"\x00" * 1000)
    assert sources.screen_file(str(padded)) == ""
    # A phone's motion photo: a video of megabytes after the JPEG (more than the tail read).
    motion = tmp_path / "motion.jpg"
    motion.write_bytes(buf.getvalue() + b"\x00\x00\x00\x18ftypmp42" + b"\x01" * (3 << 20))
    assert sources.screen_file(str(motion)) == ""
    # A camera JPEG's EXIF thumbnail ends with its own end marker, before the scan: cut after
    # the thumbnail, the file is still truncated.
    thumb = buf.getvalue()
    big = io.BytesIO()
    Image.effect_noise((256, 256), 60).convert("RGB").save(big, format="JPEG")
    app1 = b"Exif\x00\x00" + thumb
    camera = big.getvalue()[:2] + b"\xff\xe1" + (len(app1) + 2).to_bytes(2, "big") + app1 \
        + big.getvalue()[2:]
    (tmp_path / "camera.jpg").write_bytes(camera)
    assert sources.screen_file(str(tmp_path / "camera.jpg")) == ""
    (tmp_path / "camera_cut.jpg").write_bytes(camera[:len(camera) - 6000])
    assert "truncated JPEG" in sources.screen_file(str(tmp_path / "camera_cut.jpg"))
    # A PNG with a long trailer is kept; one cut before IEND is not.
    png = io.BytesIO()
    Image.new("RGB", (16, 16), (0, 90, 0)).save(png, format="PNG")
    (tmp_path / "trailer.png").write_bytes(png.getvalue() + b"\x00" * 6000)
    assert sources.screen_file(str(tmp_path / "trailer.png")) == ""
    (tmp_path / "cut.png").write_bytes(png.getvalue()[:-12] + b"\x00" * 6000)
    assert "truncated PNG" in sources.screen_file(str(tmp_path / "cut.png"))
    cut = tmp_path / "cut.JPEG"
    cut.write_bytes(buf.getvalue()[:-40])
    assert "truncated" in sources.screen_file(str(cut))


def _custom_kaggle(root, mapping, train, val, csv_rows, csv_encoding="utf-8"):
    """A Kaggle-layout tree: `mapping` (the text of LOC_synset_mapping.txt), train {class folder:
    count}, flat val/ file names, and the CSV's rows (ImageId, PredictionString)."""
    from tests.kaggle_tree import IMAGE_ROOT, image_bytes

    rng = np.random.default_rng(0)
    (root / "LOC_synset_mapping.txt").write_bytes(
        mapping.encode(csv_encoding) if isinstance(mapping, str) else mapping)
    for folder, count in train.items():
        (root / IMAGE_ROOT / "train" / folder).mkdir(parents=True)
        for n in range(count):
            (root / IMAGE_ROOT / "train" / folder / f"{n}.jpg").write_bytes(image_bytes(rng, 24))
    (root / IMAGE_ROOT / "val").mkdir(parents=True)
    for name in val:
        (root / IMAGE_ROOT / "val" / name).write_bytes(image_bytes(rng, 24))
    text = "ImageId,PredictionString\n" + "".join(f"{i},{p}\n" for i, p in csv_rows)
    (root / "LOC_val_solution.csv").write_bytes(text.encode(csv_encoding))
    return root / IMAGE_ROOT


def test_other_kaggle_layout_datasets_label_their_flat_val(tmp_path):
    """Class ids with spaces in the CSV's PredictionString (a tab-separated mapping), ImageIds
    with any extension, a UTF-16 CSV (Excel's "Unicode text"), folder names in the other Unicode
    normal form (macOS), a file whose name holds a line break."""
    import unicodedata

    mapping = "cat\tHouse cat\nwild cat\tWild cat, felid\n\u00c4rger\tTrouble\n"
    image_root = _custom_kaggle(
        tmp_path, mapping, {"cat": 2, "wild cat": 2, unicodedata.normalize("NFD", "\u00c4rger"): 2},
        ["v1.jfif", "v2.JPEG", "v3.jpg"],
        [("v1.jfif", "cat 1 2 3 4"), ("v2", "wild cat 1 2 3 4 cat 5 6 7 8"),
         ("v3", "\u00c4rger 1 2 3 4")], csv_encoding="utf-16")
    (image_root / "train" / "cat" / "line\nbreak.jpg").write_bytes(b"")
    for _ in range(2):   # built, then read back from the cached index
        src = load_source("imagenet", str(tmp_path))
        assert src.class_ids == ["cat", "wild cat", "\u00c4rger"]
        assert _as_dict(src.val) == {str(image_root / "val" / "v1.jfif"): 0,
                                     str(image_root / "val" / "v2.JPEG"): 1,
                                     str(image_root / "val" / "v3.jpg"): 2}
        assert src.train.num_examples == 6
        assert src.skipped == [(str(image_root / "train" / "cat" / "line\\nbreak.jpg"),
                                "name holds a line break or tab: rename it")]
        assert src.skipped_in("train") == src.skipped and src.skipped_in("val") == []


def test_csv_rows_pick_the_longest_class_id_and_the_files_whole_name(tmp_path):
    """A row "a b 1 2 3 4" is class "a b" even beside a class "a"; a file x.y is labelled by a row
    "x.y" even beside a file x.JPEG labelled by a row "x"; a class folder named with a line break
    is left out and reported, and the cached index reads back."""
    image_root = _custom_kaggle(tmp_path, "a\tA\na b\tAB\n", {"a": 1, "a b": 1},
                                ["x.JPEG", "x.y", "z.JPEG"],
                                [("x", "a 1 2 3 4"), ("x.y", "a b 1 2 3 4"), ("z", "a b")])
    (image_root / "train" / "bad\nname").mkdir()
    val = image_root / "val"
    for _ in range(2):
        src = load_source("imagenet", str(tmp_path))
        assert src.class_ids == ["a", "a b"]
        assert _as_dict(src.val) == {str(val / "x.JPEG"): 0, str(val / "x.y"): 1,
                                     str(val / "z.JPEG"): 1}
        assert src.skipped == [(str(image_root / "train" / "bad\\nname"),
                                "name holds a line break or tab: rename it")]


def test_an_image_on_several_csv_rows_takes_its_first_rows_label(tmp_path):
    """A CSV written one row per box (a detection export) repeats the ImageId: the first row's
    label counts, as the first box of a row does (the last row's had won, silently)."""
    image_root = _custom_kaggle(tmp_path, "cat Cat\ndog Dog\n", {"cat": 1, "dog": 1},
                                ["v1.jpg", "v2.jpg"],
                                [("v1", "cat 1 2 3 4"), ("v1", "dog 5 6 7 8"), ("v2", ""),
                                 ("v2", "dog 1 2 3 4"), ("v2", "cat 1 2 3 4")])
    val = image_root / "val"
    assert _as_dict(load_source("imagenet", str(tmp_path)).val) == {
        str(val / "v1.jpg"): 0, str(val / "v2.jpg"): 1}


def test_label_files_in_another_encoding_are_refused_in_one_line(tmp_path):
    _custom_kaggle(tmp_path, "cat K\xe4se\ndog Dog\n", {"cat": 1, "dog": 1}, ["v1.jpg"],
                   [("v1", "cat")], csv_encoding="latin-1")
    with pytest.raises(DataError, match=r"LOC_synset_mapping.txt is not UTF-8 text \(byte 0xe4 "
                                        r"at offset 5\): save it as UTF-8, e.g. iconv") as error:
        load_source("imagenet", str(tmp_path))
    assert "\n" not in str(error.value)


def test_val_entries_left_out_are_reported(tmp_path):
    """Files with no CSV row, an unknown label or a row without a label, rows with no file
    (named with val/'s own extension), an empty val/ beside a CSV that lists images; a class id
    listed twice."""
    image_root = _custom_kaggle(tmp_path, "cat Cat\ndog Dog\n", {"cat": 1, "dog": 1},
                                ["v1.jpg", "v2.jpg", "v3.jpg", "v5.jpg"],
                                [("v1", "cat"), ("v2", "fox 1 2 3 4"), ("v4", "dog"), ("v5", "")])
    val = image_root / "val"
    src = load_source("imagenet", str(tmp_path))
    assert _as_dict(src.val) == {str(val / "v1.jpg"): 0}
    assert sorted(src.skipped_in("val")) == [
        (str(val / "v2.jpg"), "label fox not in LOC_synset_mapping.txt"),
        (str(val / "v3.jpg"), "no row in LOC_val_solution.csv"),
        (str(val / "v4.jpg"), "missing (listed in LOC_val_solution.csv)"),
        (str(val / "v5.jpg"), "its row in LOC_val_solution.csv has no label")]
    for name in ("v1.jpg", "v2.jpg", "v3.jpg", "v5.jpg"):
        os.remove(val / name)
    assert load_source("imagenet", str(tmp_path)).skipped_in("val") == [
        (str(val), "empty, though LOC_val_solution.csv lists images: extract them again")]
    (tmp_path / "LOC_synset_mapping.txt").write_text("cat Cat\ndog Dog\ncat Kitty\n")
    with pytest.raises(DataError, match="lists the class id 'cat' twice: each class once"):
        load_source("imagenet", str(tmp_path))
