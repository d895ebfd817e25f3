"""What every command shares: its flags' registration, its name, its errors.

A command module defines its flags on `new_flags()` (its own
`flags.FlagValues`, so two commands never collide on one name) and calls
`run(FLAGS, main, doc)` from its `run()`. Imports absl and the standard
library only: TensorFlow loads after the flags are checked.
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags

from ring_loss_tf.errors import ConfigError
from ring_loss_tf import config as config_lib

# The installed names (pyproject.toml, [project.scripts]) and what else
# starts the same command.
COMMANDS = {
    "ring-loss-train": "train.py",
    "ring-loss-evaluate": "evaluate.py",
    "ring-loss-export": "python -m ring_loss_tf.export",
    "ring-loss-align": "python -m ring_loss_tf.data.align",
    "ring-loss-convert": "python -m ring_loss_tf.data.convert",
}

_DEFINE = {
    "str": flags.DEFINE_string,
    "size": flags.DEFINE_string,
    "radius": flags.DEFINE_string,
    "int": flags.DEFINE_integer,
    "float": flags.DEFINE_float,
    "bool": flags.DEFINE_boolean,
}


def new_flags() -> flags.FlagValues:
    """An empty set of flags for one command."""
    return flags.FlagValues()


def define_settings(flag_values, names):
    """One flag per `TrainConfig` setting of `names`, with its name, default
    and help (`ring_loss_tf.config.FIELDS`)."""
    for name in names:
        field = config_lib.FIELDS[name]
        default = field.default
        if field.kind == "size" and default is not None:
            default = ",".join(str(v) for v in default)
        elif field.kind == "radius":
            default = str(default)
        _DEFINE[field.kind](name, default, field.help, flag_values=flag_values)


def settings_of(flag_values, names, present_only=False):
    """{setting: value} of the flags of `names`, parsed as `make` takes
    them; raises `ConfigError` for a malformed size or radius."""
    settings = {}
    for name in names:
        if present_only and not flag_values[name].present:
            continue
        field = config_lib.FIELDS[name]
        value = flag_values[name].value
        if field.kind == "size":
            value = config_lib.parse_image_size(value)
        elif field.kind == "radius":
            value = config_lib.parse_radius(value)
        settings[name] = value
    return settings


def install(flag_values):
    """Adds a command's flags to absl's global flags (where `absl.app`
    parses them and `--help` lists them as the program's own); the
    command reads them through `flag_values`. Idempotent."""
    main = sys.argv[0] if sys.argv else "__main__"
    for name, flag in flag_values._flags().items():  # noqa: SLF001
        if name in flags.FLAGS and flags.FLAGS[name] is flag:
            continue
        flags.FLAGS[name] = flag
        if name == flag.name:
            flags.FLAGS.register_flag_by_module(main, flag)
            flags.FLAGS.register_key_flag_for_module(main, flag)
    # Reads before a parse give the defaults, as in absl's own tests.
    flag_values.mark_as_parsed()


def run(flag_values, main, doc, argv=None):
    """Runs `main` under `absl.app` with the command's flags; `doc` is what
    --help prints above them."""
    install(flag_values)
    main_module = sys.modules.get("__main__")
    if main_module is not None:
        # --help prints __main__'s docstring: the command's, also when
        # __main__ is a console script or a thin wrapper.
        main_module.__doc__ = doc
    app.run(main, argv=argv)


def call(flag_values, main, argv, program):
    """Runs the command in this process with `argv` (no program name), as
    `run` would, without absl.app; returns `main`'s exit status.

    For tests: the flags are reset to their defaults first. absl's own
    flags (--verbosity, --help) are not part of it.
    """
    flag_values.unparse_flags()
    rest = flag_values([program, *argv])
    return main(rest)


def program(default: str) -> str:
    """The name this process was started as: train.py, evaluate.py or an
    installed command; `default` (the installed name) otherwise."""
    path = sys.argv[0] if sys.argv else ""
    name = os.path.basename(path)
    parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
    if name in COMMANDS or (
        name in ("train.py", "evaluate.py") and parent != "commands"
    ):
        return name
    module = f"python -m ring_loss_tf.{name[:-3]}"
    if os.path.basename(os.path.dirname(path)) == "ring_loss_tf" and (
        module in COMMANDS.values()
    ):
        return module
    return default


def command_line(default: str) -> list[str]:
    """This process's command as a user would type it again."""
    name = program(default)
    if name.endswith(".py"):
        return ["python", *sys.argv]
    return [*name.split(), *sys.argv[1:]]


def fail(default: str, message: str, status: int = 2):
    """Prints `<program>: error: <message>` and exits with `status`."""
    print(f"{program(default)}: error: {message}", file=sys.stderr)
    sys.exit(status)


def fail_setting(default: str, error: ConfigError):
    """One line for a `ConfigError`: the flag, its value, the fix."""
    fail(
        default,
        f"--{error.setting}={error.value}: {error.problem}; " f"{error.fix}",
    )


def quiet_tensorflow():
    """Imports TensorFlow without its start-up log (`ring_loss_tf.quiet`)
    and leaves absl logging at WARNING unless --verbosity was given."""
    from absl import logging

    from ring_loss_tf import quiet

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    quiet.import_tensorflow()
