"""The code blocks of README.md and docs/*.md, and how tests/test_docs.py
runs them.

A block is a fenced ```python, ```bash or ```sh block (other languages,
e.g. ```text or ```bibtex, are not code to run). An HTML comment on the
line before the fence says how to run it:

    <!-- docs-test: skip (REASON) -->        not run; REASON is required
    <!-- docs-test: slow -->                 a Python block that trains, or
                                             reads what earlier blocks wrote
    <!-- docs-test: without ring_loss_tf --> a Python block run where
                                             `import ring_loss_tf` fails
    <!-- docs-test: files a.jpg b.png -->    small images of these names
                                             are written first
    <!-- docs-test: needs runs/a runs/b -->  tiny trained runs are put in
                                             these directories first

Unmarked Python blocks are cheap (imports, Keras snippets): each runs alone.
Shell blocks and marked Python blocks run page by page, in the page's
order, in one directory, shrunk to seconds: `python train.py` gets
`TINY_FLAGS` appended (absl takes the last value of a flag), and in
Python `ring_loss_tf.config.make` applies `TINY_SETTINGS` over the block's
own. Installation commands (`python3 -m venv`, activating it, `pip
install`) are not run: `.ci/run` installs into a fresh virtualenv.
"""

import dataclasses
import pathlib
import re
import shlex

ROOT = pathlib.Path(__file__).resolve().parent.parent
LANGUAGES = {"python": "python", "bash": "shell", "sh": "shell"}
MARKER = re.compile(r"^<!--\s*docs-test:\s*(.*?)\s*-->$")
FENCE = re.compile(r"^(\s*)```\s*([\w+-]*)\s*$")
INSTALL = re.compile(
    r"^(python3? -m venv\b|\. \S*activate$|source \S*activate$|pip install\b)"
)


def tiny_settings(cache_dir):
    """A 2-step run on 12 characters × 6 images of 16×16 pixels."""
    return {
        "cache_dir": str(cache_dir),
        "num_train_identities": 12,
        "num_test_identities": 6,
        "train_samples_per_identity": 6,
        "test_samples_per_identity": 3,
        "pairs_per_fold": 3,
        "kanji_image_size": 16,
        "batch_size": 8,
        "steps": 2,
    }


def tiny_flags(cache_dir):
    return " ".join(
        f"--{name}={value}" for name, value in tiny_settings(cache_dir).items()
    )


@dataclasses.dataclass
class Block:
    page: str  # "README.md" or "docs/x.md"
    line: int  # the line of the opening fence, from 1
    kind: str  # "python" | "shell"
    code: str
    marker: str  # the marker's text, "" without one

    @property
    def name(self):
        return f"{self.page}:{self.line}"

    @property
    def skip_reason(self):
        match = re.fullmatch(r"skip \((.+)\)", self.marker)
        return match.group(1) if match else None

    @property
    def slow(self):
        return self.kind == "shell" or bool(self.marker)

    def words(self, keyword):
        """The words after `keyword` in the marker, or None."""
        if self.marker.split(" ", 1)[0] != keyword:
            return None
        return self.marker.split()[1:]


def pages():
    return [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))


def blocks(path, root=ROOT):
    """Every block of the page at `path`; ValueError on a bad marker or an
    unclosed fence."""
    lines = path.read_text(encoding="utf-8").split("\n")
    page = path.relative_to(root).as_posix()
    found, index = [], 0
    while index < len(lines):
        fence = FENCE.match(lines[index])
        if not fence:
            index += 1
            continue
        indent, language = fence.groups()
        end = index + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        if end == len(lines):
            raise ValueError(f"{page} line {index + 1}: unclosed ``` fence")
        before = index - 1
        while before >= 0 and not lines[before].strip():
            before -= 1
        marker = ""
        if before >= 0:
            match = MARKER.match(lines[before].strip())
            if match:
                marker = match.group(1)
        if language in LANGUAGES:
            code = "\n".join(
                line[len(indent) :] if line.startswith(indent) else line
                for line in lines[index + 1 : end]
            )
            block = Block(page, index + 1, LANGUAGES[language], code, marker)
            check_marker(block)
            found.append(block)
        elif marker:
            raise ValueError(
                f"{block_name(page, index)}: a docs-test marker before a "
                f"```{language} block, which is never run; remove it"
            )
        index = end + 1
    return found


def block_name(page, index):
    return f"{page}:{index + 1}"


def check_marker(block):
    marker = block.marker
    if not marker:
        return
    keyword = marker.split(" ", 1)[0]
    if keyword == "skip":
        if block.skip_reason is None:
            raise ValueError(
                f"{block.name}: write the reason, e.g. "
                f"<!-- docs-test: skip (needs a GPU) -->; found {marker!r}"
            )
        return
    if keyword in ("slow", "without", "files", "needs"):
        if keyword == "without" and marker != "without ring_loss_tf":
            raise ValueError(f"{block.name}: unknown marker {marker!r}")
        if block.kind != "python" and keyword in ("without", "slow"):
            raise ValueError(
                f"{block.name}: {marker!r} is for Python blocks; shell "
                "blocks are always in the slow set"
            )
        return
    raise ValueError(
        f"{block.name}: unknown docs-test marker {marker!r} (skip (REASON), "
        "slow, without ring_loss_tf, files NAMES, needs DIRS)"
    )


def shell_script(code, python, cache_dir):
    """`code` as a bash script: continuation lines joined, installation
    commands left out, `python` the interpreter running the tests, and
    train.py runs shrunk. Returns (script, commands left out)."""
    code = re.sub(r"\s*\\\n\s*", " ", code)
    commands, left_out = [], []
    for line in code.split("\n"):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        kept = []
        for part in re.split(r"\s+&&\s+", stripped):
            if INSTALL.match(part):
                left_out.append(part)
                continue
            kept.append(shrink(part, python, cache_dir))
        if kept:
            commands.append(" && ".join(kept))
    return "set -euo pipefail\n" + "\n".join(commands) + "\n", left_out


def shrink(command, python, cache_dir):
    """One command: `python X.py` of this repository run from anywhere,
    `python train.py` with the tiny flags before any trailing comment."""
    words = command.split(" #", 1)
    command, comment = words[0].rstrip(), (
        " #" + words[1] if len(words) > 1 else ""
    )
    match = re.match(r"^python3?\s+(\S+\.py)\b(.*)$", command)
    if match:
        script, rest = match.groups()
        command = f"{shlex.quote(python)} {ROOT / script}{rest}"
        if script == "train.py":
            command += " " + tiny_flags(cache_dir)
    elif re.match(r"^python3?\s+-m\s", command):
        command = shlex.quote(python) + " " + command.split(None, 1)[1]
    return command + comment


PYTHON_PREAMBLE = """\
import ring_loss_tf.config as _config

_make = _config.make


def _tiny_make(**settings):
    return _make(**{{**settings, **{settings!r}}})


_config.make = _tiny_make
del _tiny_make
"""


def python_script(block, cache_dir):
    """The block as a script; with `config.make` shrunk when it uses it."""
    if block.words("without") is not None or "config.make" not in block.code:
        return block.code + "\n"
    preamble = PYTHON_PREAMBLE.format(settings=tiny_settings(cache_dir))
    return preamble + "\n" + block.code + "\n"
