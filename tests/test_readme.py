"""The README's commands use only flags that exist (a user copies them)."""

import collections
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMAND = re.compile(r"(train_main\.py|python -m ([\w.]+))")
FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9_]*)")


def readme_flags():
    """{program: {flag, ...}} for every command line of the README and its flags table."""
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    text = re.sub(r"\\\n\s*", " ", text)  # join shell continuation lines
    found = collections.defaultdict(set)
    for line in text.splitlines():
        if line.startswith("| `--"):  # the flags table of train_main.py
            found["train_main.py"].update(FLAG.findall(line.split("|")[1]))
            continue
        matches = list(COMMAND.finditer(line))
        for i, match in enumerate(matches):
            end = matches[i + 1].start() if i + 1 < len(matches) else len(line)
            segment = line[match.end():end].split("#")[0].split("`")[0]
            program = match.group(2) or match.group(1)
            found[program].update(FLAG.findall(segment))
    return found


def test_readme_flags_exist():
    found = readme_flags()
    assert {"train_main.py", "keras_resnet.export", "keras_resnet.predict",
            "keras_resnet.download", "keras_resnet.benchmark", "pipelines.benchmark"} <= set(found)
    assert {"depth", "batch_size", "data_dir", "summary", "check_images"} <= found["train_main.py"]
    missing = {}
    for program, flags in sorted(found.items()):
        argv = [program] if program.endswith(".py") else ["-m", program]
        help_text = subprocess.run(
            [sys.executable, *argv, "--helpfull" if program in ABSL else "--help"],
            capture_output=True, text=True, timeout=120, cwd=REPO,
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")).stdout
        assert help_text, program
        absent = sorted(f for f in flags if not re.search(rf"--(\[no\])?{f}\b", help_text))
        if absent:
            missing[program] = absent
    assert not missing, f"README flags that the programs do not define: {missing}"


ABSL = ("train_main.py", "keras_resnet.benchmark", "keras_resnet.data_service")
