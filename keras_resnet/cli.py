"""absl flags for the `python -m` commands, defined by each command on its own `FlagValues`.

A command module defines its flags in a function, not at import, so it can be imported as a
library (or by a test, beside other commands) without claiming global flag names. `run` parses
argv (with `--flagfile=FILE` and `--help`), prints a one-line error for a bad flag, and calls
`main(flag_values, args)`. `train_main.py` uses absl's global `FLAGS` and `app.run`, as a script.
Every command first sets up readable logs (`keras_resnet.logs`).
"""

import sys

from absl import flags

from keras_resnet import logs


class UsageError(Exception):
    """A wrong or missing flag: printed as `error: ...`, exit status 2."""


def parse(define_flags, argv, *, prog, doc="", positional=False):
    """(FlagValues, positional args) for `argv` (argv[0] is the program); exits on --help."""
    values = flags.FlagValues()
    define_flags(values)
    if any(arg in ("--help", "-h", "--helpfull") for arg in argv[1:]):
        print(f"usage: python -m {prog} [flags]{' FILE...' if positional else ''}\n")
        if doc:
            print(doc.strip() + "\n")
        print(values.get_help())
        sys.exit(0)
    try:
        rest = values(list(argv))
    except flags.Error as e:
        raise UsageError(str(e)) from None
    args = rest[1:]
    if args and not positional:
        raise UsageError(f"unexpected arguments: {' '.join(args)}; flags look like --name=value")
    return values, args


def fail(message):
    """A command's one-line error on stderr; returns exit status 1 (the input was wrong)."""
    print(f"error: {message}", file=sys.stderr)
    return 1


def run(define_flags, main, argv=None, *, prog, doc="", positional=False):
    """Parses flags and runs `main(flag_values, args) -> exit status`; returns the exit status.

    A command that uses TensorFlow imports it first with `logs.import_tensorflow()` (after its
    flags are checked, so a usage error comes at once).
    """
    argv = sys.argv if argv is None else [prog, *argv]
    logs.setup()
    try:
        values, args = parse(define_flags, argv, prog=prog, doc=doc, positional=positional)
        return main(values, args) or 0
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
