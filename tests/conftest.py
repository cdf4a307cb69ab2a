"""Test-wide settings: CPU only, quiet TensorFlow logs, float32 unless a test says otherwise."""

import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # tests are CPU tests, also on GPU machines
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import shutil  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _float32_policy():
    """Each test starts and ends with the float32 policy (a test may change the global one)."""
    import keras

    keras.mixed_precision.set_global_policy("float32")
    yield
    keras.mixed_precision.set_global_policy("float32")


@pytest.fixture(scope="module", autouse=True)
def _module_temporaries(request, tmp_path_factory):
    """Remove the folders a module's fixtures made once the module is done, unless a test failed.

    Each training run leaves checkpoints and .keras files (about 0.4 GB for a ResNet-18), and
    pytest keeps every temporary folder until the session ends: the whole suite wrote 15 GB to
    /tmp, more than a CI machine's disk may have free. A passing test's own tmp_path goes at its
    teardown (tmp_path_retention_policy = failed in setup.cfg); this does the same for the
    module-scoped folders. A failed test keeps everything for a look.
    """
    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed == failed:
        for path in set(base.iterdir()) - before:
            shutil.rmtree(path, ignore_errors=True)
