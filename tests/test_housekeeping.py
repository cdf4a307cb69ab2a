"""The suite's own housekeeping: passing tests leave no temporary folders behind, failing ones do.

Training runs write checkpoints and .keras files; kept until the session ends they added up to
15 GB of /tmp, which a CI machine did not have.
"""

import configparser
import pathlib

pytest_plugins = ["pytester"]

TESTS = pathlib.Path(__file__).parent

INNER = """
import pathlib

import pytest

LOG = pathlib.Path({log!r})


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    (path / "ckpt").write_bytes(b"x" * 1000)
    with LOG.open("a") as f:
        f.write(f"{{path}}\\n")
    return path


def test_writes_its_own(tmp_path, run_dir):
    (tmp_path / "model.keras").write_bytes(b"x" * 1000)
    with LOG.open("a") as f:
        f.write(f"{{tmp_path}}\\n")
    assert {outcome}


def test_the_folder_of_a_passed_test_is_gone_already():
    first = pathlib.Path(LOG.read_text().splitlines()[-1])
    assert first.exists() is not {outcome}
"""


def _run(pytester, outcome):
    ini = configparser.ConfigParser()
    ini.read(TESTS.parent / "setup.cfg")
    pytester.makeini("[pytest]\ntmp_path_retention_policy = "
                     + ini["tool:pytest"]["tmp_path_retention_policy"] + "\n")
    pytester.makeconftest((TESTS / "conftest.py").read_text())
    log = pytester.path / "made.txt"
    pytester.makepyfile(test_inner=INNER.format(log=str(log), outcome=outcome))
    # A given base folder, as pytest-xdist gives each worker: pytest then never removes it whole,
    # so only the removals made while the session runs count.
    result = pytester.runpytest_inprocess("-p", "no:xdist", "-p", "no:cacheprovider",
                                          f"--basetemp={pytester.path / 'base'}")
    made = [pathlib.Path(line) for line in log.read_text().splitlines()]
    assert len(made) == 2  # the module's folder and the test's own
    return result, made


def test_a_passing_module_leaves_no_folders(pytester):
    result, made = _run(pytester, "True")
    result.assert_outcomes(passed=2)
    assert [path for path in made if path.exists()] == []


def test_a_failing_test_keeps_its_folders_for_a_look(pytester):
    result, made = _run(pytester, "False")
    result.assert_outcomes(failed=1, passed=1)
    assert all((path / name).exists() for path, name in zip(made, ["ckpt", "model.keras"], strict=True))
