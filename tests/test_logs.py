"""Readable logs: TensorFlow's start-up noise filtered by level, our lines short, the CPU's
bfloat16 decision from /proc/cpuinfo, and a demo epoch whose log holds no error or noise line."""

import logging
import os
import re
import subprocess
import sys

import pytest

from keras_resnet import logs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTICE = ("WARNING: All log messages before absl::InitializeLog() is called are written to "
          "STDERR")
ONEDNN = ("I0000 00:00:1796226254.788887    2426 port.cc:153] oneDNN custom operations are on. "
          "You may see slightly different numerical results")
CUINIT = ("E0000 00:00:1796226256.005067    2426 cuda_platform.cc:52] failed call to cuInit: "
          "INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)")
WARNING = ("W0000 00:00:1796226259.512724    2426 dataset.cc:997] Input of GeneratorDatasetOp::"
           "Dataset will not be optimized")
ERROR = "E1202 15:44:16.800494 140715485535104 kernel.cc:12] Out of memory while allocating"
# Lines a first run must not show (issue 19's log of `make demo`).
NOISE = (re.compile(r"^E\d{4} "), re.compile(r"^ERROR"), re.compile("cuInit"),
         re.compile("GeneratorDatasetOp"), re.compile(r"Local rendezvous .*CANCELLED"),
         re.compile("absl::InitializeLog"), re.compile("oneDNN custom operations"),
         re.compile("Traceback"))


@pytest.mark.parametrize("line, level, no_gpu, dropped", [
    (NOTICE, 1, True, True),
    (NOTICE, 0, True, False),  # TF_CPP_MIN_LOG_LEVEL=0: the user asked for everything
    (ONEDNN, 1, True, True),
    (ONEDNN, 0, True, False),
    (CUINIT, 1, True, True),
    (CUINIT, 1, False, False),  # a machine with an NVIDIA device: a failed cuInit is real
    (WARNING, 1, True, False),
    (WARNING, 2, True, True),
    (ERROR, 1, True, False),
    (ERROR, 2, True, False),
    (ERROR, 3, True, True),
    ("Traceback (most recent call last):", 3, True, False),  # not a C++ log line: always kept
])
def test_start_up_lines_follow_the_log_level(line, level, no_gpu, dropped):
    assert logs.is_noise(line + "\n", level, no_gpu) is dropped


def test_filtered_stderr_passes_real_lines_and_drops_noise(capfd):
    with logs.filtered_stderr(lambda line: logs.is_noise(line, 1, True)):
        os.write(2, f"{NOTICE}\n{ONEDNN}\n{ERROR}\n{CUINIT}\n".encode())
        os.write(2, b"Traceback (most recent call last):\n")
    err = capfd.readouterr().err
    assert err == f"{ERROR}\nTraceback (most recent call last):\n"


def test_no_gpu_possible_follows_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert logs.no_gpu_possible()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert logs.no_gpu_possible()


def test_our_lines_are_short():
    record = logging.LogRecord("absl", logging.INFO, "/x/distribute.py", 53, "Epoch %d", (1,),
                               None)
    assert re.fullmatch(r"\d\d:\d\d:\d\d Epoch 1", logs.Formatter().format(record))
    record.levelno, record.levelname = logging.WARNING, "WARNING"
    assert re.fullmatch(r"\d\d:\d\d:\d\d WARNING: Epoch 1", logs.Formatter().format(record))


def test_setup_keeps_the_users_level_and_flag_wins(monkeypatch):
    monkeypatch.setenv(logs.LEVEL_ENV, "0")
    logs.setup(absl_app=True)
    assert os.environ[logs.LEVEL_ENV] == "0"
    logs.setup(2, absl_app=True)
    assert os.environ[logs.LEVEL_ENV] == "2"
    monkeypatch.delenv(logs.LEVEL_ENV)
    logs.setup(absl_app=True)
    assert os.environ[logs.LEVEL_ENV] == str(logs.DEFAULT_TF_LOG_LEVEL)


CPUINFO = """processor\t: 0
vendor_id\t: {vendor}
cpu family\t: {family}
model\t\t: 17
model name\t: {name}
flags\t\t: fpu sse2 avx2 {flags}

processor\t: 1
vendor_id\t: {vendor}
"""


@pytest.mark.parametrize("vendor, family, flags, fast", [
    ("GenuineIntel", 6, "avx512f avx512_bf16 amx_bf16 amx_tile", True),   # Sapphire Rapids
    ("GenuineIntel", 6, "avx512f avx512_bf16", False),                    # Cooper Lake: no AMX
    ("GenuineIntel", 6, "avx512f", False),
    ("AuthenticAMD", 25, "avx512f avx512_bf16", True),                    # Zen 4 (Genoa)
    ("AuthenticAMD", 26, "avx512f avx512_bf16", True),                    # Zen 5
    ("AuthenticAMD", 25, "avx2", False),                                  # Zen 3 (Milan)
    ("AuthenticAMD", 23, "avx2", False),                                  # Zen 2
    ("HygonGenuine", 24, "avx2 avx512_bf16", False),                      # unknown: float32
])
def test_cpu_bfloat16_decision_table(tmp_path, vendor, family, flags, fast):
    from keras_resnet.training import distribute

    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO.format(vendor=vendor, family=family, name="Some CPU", flags=flags))
    cpu = distribute.read_cpuinfo(str(path))
    assert cpu["vendor"] == vendor and cpu["family"] == family
    decided, why = distribute.cpu_bfloat16(cpu)
    assert decided is fast, why
    assert why  # the reason is logged


def test_unreadable_cpuinfo_means_float32(tmp_path):
    from keras_resnet.training import distribute

    cpu = distribute.read_cpuinfo(str(tmp_path / "missing"))
    assert cpu == {} and distribute.cpu_bfloat16(cpu)[0] is False


@pytest.mark.slow
def test_demo_first_epoch_log_is_clean(tmp_path):
    """The demo configuration's first epoch, with the user's default environment (no
    TF_CPP_MIN_LOG_LEVEL): no error-level line and none of the known noise lines."""
    env = {k: v for k, v in os.environ.items() if k != logs.LEVEL_ENV}
    done = subprocess.run(
        [sys.executable, "train_main.py", "--flagfile=configs/demo.flags", "--epochs=1",
         f"--data_dir={tmp_path / 'demo'}", f"--model_dir={tmp_path / 'run'}",
         f"--export_dir={tmp_path / 'export'}", "--verbose=2"],
        capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    noisy = [line for line in output.splitlines() if any(p.search(line) for p in NOISE)]
    assert not noisy, "\n".join(noisy)
    if logs.no_gpu_possible():
        assert output.count("No GPU found: training on the CPU") == 1, output[:3000]
    assert re.search(r"^\d\d:\d\d:\d\d Precision policy: ", output, re.M), output[:3000]
    assert (tmp_path / "export" / "1" / "saved_model.pb").exists()
