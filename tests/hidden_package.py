"""A child Python process in which `import ring_loss_tf` fails.

An export must serve without this package (TF Serving, another project).
The tests that check it run their script with `env(tmp_path)`, whose
PYTHONPATH puts first a `ring_loss_tf` that raises ImportError, and start
the script with `PREAMBLE`, which stops if the package imports all the
same (then the test would hide nothing).
"""

import os
import pathlib
import textwrap

PREAMBLE = textwrap.dedent("""
    import sys
    try:
        import ring_loss_tf
    except ImportError:
        pass
    else:
        sys.exit("ring_loss_tf is importable: the test hides nothing")
    """)


def env(tmp_path):
    """`os.environ` with a hiding `ring_loss_tf` under `tmp_path` first."""
    hidden = pathlib.Path(tmp_path) / "hidden" / "ring_loss_tf"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text(
        "raise ImportError('ring_loss_tf is hidden by the test')\n"
    )
    return dict(os.environ, PYTHONPATH=str(hidden.parent),
                TF_CPP_MIN_LOG_LEVEL="3")
