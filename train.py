"""`python train.py`: the ring-loss-train command from a checkout.

The flags, their checks and `main` are in ring_loss_tf/commands/train.py
(`--help` prints that module's description); docs/commands.md lists every
command.
"""

from ring_loss_tf.commands import train as _command

if __name__ == "__main__":
    _command.run()
