"""`python evaluate.py`: the ring-loss-evaluate command from a checkout.

The flags, their checks and `main` are in ring_loss_tf/commands/evaluate.py
(`--help` prints that module's description); docs/commands.md lists every
command. Importing this module adds the command's flags to absl's global
flags, and its other names are the command module's.
"""

from ring_loss_tf.commands import evaluate as _command

_command.install()
# Its errors' name in a process started otherwise (a test importing this).
_command.NAME = "evaluate.py"


def __getattr__(name):
    return getattr(_command, name)


if __name__ == "__main__":
    _command.run()
