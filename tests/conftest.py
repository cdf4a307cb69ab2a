"""Test-wide settings: CPU only, quiet TensorFlow logs, float32 unless a test says otherwise."""

import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # tests are CPU tests, also on GPU machines
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _float32_policy():
    """Each test starts and ends with the float32 policy (a test may change the global one)."""
    import keras

    keras.mixed_precision.set_global_policy("float32")
    yield
    keras.mixed_precision.set_global_policy("float32")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a long test (the fast tier runs -m 'not slow')")
