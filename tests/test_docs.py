"""Every code block of README.md and docs/*.md runs (tests/docs_blocks.py
says how blocks are found, marked and shrunk).

The cheap Python blocks run here in the fast set, each alone in a fresh
directory; the shell blocks and the marked Python blocks run in the slow
set, one test per page, in the page's order (`python train.py` shrunk to a
2-step run on a tiny embedded set). A block that no longer runs fails.
"""

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests import docs_blocks
from tests import hidden_package

ALL = {path: docs_blocks.blocks(path) for path in docs_blocks.pages()}
FAST = [
    b
    for page in ALL.values()
    for b in page
    if not b.slow and b.skip_reason is None
]
SLOW_PAGES = sorted(
    {
        b.page
        for page in ALL.values()
        for b in page
        if b.slow and b.skip_reason is None
    }
)
TIMEOUT = 600


def _env(tmp_path):
    env = dict(
        os.environ, PYTHONPATH=str(docs_blocks.ROOT), TF_CPP_MIN_LOG_LEVEL="3"
    )
    env.pop("KERAS_BACKEND", None)  # a block chooses its own backend
    # `python` in a shell block is the interpreter running the tests.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]
    env["MPLBACKEND"] = "Agg"
    return env


def _run(args, cwd, env, what):
    result = subprocess.run(
        args,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, (
        f"{what} failed (exit {result.returncode}):\n"
        f"--- stdout\n{result.stdout[-4000:]}\n"
        f"--- stderr\n{result.stderr[-4000:]}"
    )
    return result


def _run_python(block, cwd, cache_dir):
    script = cwd / f"block_{block.line}.py"
    if block.words("without") is not None:
        env = hidden_package.env(cwd / f"hidden_{block.line}")
        env["PATH"] = (
            os.path.dirname(sys.executable) + os.pathsep + (env["PATH"])
        )
        code = hidden_package.PREAMBLE + "\n" + block.code + "\n"
    else:
        env = _env(cwd)
        code = docs_blocks.python_script(block, cache_dir)
    script.write_text(code, encoding="utf-8")
    return _run([sys.executable, str(script)], cwd, env, block.name)


def test_the_pages_have_blocks_and_every_block_is_run_or_marked(capsys):
    counts = {"fast": 0, "slow": 0, "skipped": 0}
    skipped = []
    for page in ALL.values():
        for block in page:
            if block.skip_reason is not None:
                counts["skipped"] += 1
                skipped.append(f"  {block.name}: {block.skip_reason}")
            else:
                counts["slow" if block.slow else "fast"] += 1
    with capsys.disabled():
        print(
            f"\ndocs blocks: {sum(counts.values())} in "
            f"{len(ALL)} pages: {counts['fast']} run in the fast set, "
            f"{counts['slow']} in the slow set (tests/test_docs.py), "
            f"{counts['skipped']} skipped:\n" + "\n".join(skipped)
        )
    # The README's quick start, the Keras snippet and a training command
    # are run, not skipped.
    assert counts["fast"] >= 4 and counts["slow"] >= 10
    assert counts["skipped"] < counts["fast"] + counts["slow"]


def test_the_readme_opens_with_the_install_and_the_test_command():
    readme = ALL[docs_blocks.ROOT / "README.md"]
    assert readme[0].code == (
        "python3 -m venv .venv && . .venv/bin/activate && pip install -e . "
        "&& python train.py --lambda_ring=0.01"
    )
    # .ci/run runs this command verbatim.
    assert readme[1].code == 'pip install -e ".[test]" && python -m pytest'
    assert (
        'pip install -e ".[test]" && python -m pytest'
        in (docs_blocks.ROOT / ".ci" / "run").read_text()
    )


def test_a_bad_marker_is_one_line_naming_the_block(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("<!-- docs-test: skip -->\n```bash\nls\n```\n")
    with pytest.raises(ValueError, match=r"page.md:2: write the reason"):
        docs_blocks.blocks(page, tmp_path)
    page.write_text("<!-- docs-test: sometimes -->\n```python\n1\n```\n")
    with pytest.raises(ValueError, match="unknown docs-test marker"):
        docs_blocks.blocks(page, tmp_path)
    page.write_text("```python\n1\n")
    with pytest.raises(ValueError, match="page.md line 1: unclosed"):
        docs_blocks.blocks(page, tmp_path)


def test_shell_blocks_are_shrunk_and_installs_left_out(tmp_path):
    script, left_out = docs_blocks.shell_script(
        "python3 -m venv .venv && . .venv/bin/activate && pip install -e ."
        " && python train.py --lambda_ring=0.01 \\\n    --steps=28000\n"
        'pip install -e ".[align]"   # the detector\n'
        "python -m ring_loss_tf.export --model_dir runs/a  # a comment\n",
        "/venv/bin/python",
        tmp_path / "cache",
    )
    assert left_out == [
        "python3 -m venv .venv",
        ". .venv/bin/activate",
        "pip install -e .",
        'pip install -e ".[align]"   # the detector',
    ]
    lines = script.splitlines()
    assert lines[0] == "set -euo pipefail"
    train = lines[1]
    assert train.startswith(
        f"/venv/bin/python {docs_blocks.ROOT / 'train.py'} "
        "--lambda_ring=0.01 --steps=28000 "
    )
    # absl keeps the last value: the tiny flags come after the block's.
    assert train.endswith("--steps=2")
    assert f"--cache_dir={tmp_path / 'cache'}" in train
    assert lines[2] == (
        "/venv/bin/python -m ring_loss_tf.export --model_dir runs/a"
        " # a comment"
    )
    assert len(lines) == 3


@pytest.mark.parametrize("block", FAST, ids=lambda b: b.name)
def test_python_block(block, tmp_path):
    _run_python(block, tmp_path, tmp_path / "cache")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny trained run (`python train.py`), copied where a block
    needs one."""
    where = tmp_path_factory.mktemp("tiny_run")
    cache = where / "cache"
    script, _ = docs_blocks.shell_script(
        "python train.py --lambda_ring=0.01 --model_dir=run",
        sys.executable,
        cache,
    )
    _run(["bash", "-c", script], where, _env(where), "the tiny run")
    return where / "run", cache


def _write_images(names, cwd):
    rng = np.random.default_rng(0)
    for name in names:
        pixels = rng.integers(0, 256, (40, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(cwd / name)


@pytest.mark.parametrize("page", SLOW_PAGES)
def test_page_commands(page, tmp_path, request):
    cache = tmp_path / "cache"
    ran = 0
    for block in ALL[docs_blocks.ROOT / page]:
        if block.skip_reason is not None or not block.slow:
            continue
        if block.words("files"):
            _write_images(block.words("files"), tmp_path)
        if block.words("needs"):
            run, cache = request.getfixturevalue("tiny_run")
            for name in block.words("needs"):
                if not (tmp_path / name).exists():
                    shutil.copytree(run, tmp_path / name)
        if block.kind == "python":
            _run_python(block, tmp_path, cache)
        else:
            script, _ = docs_blocks.shell_script(
                block.code, sys.executable, cache
            )
            _run(["bash", "-c", script], tmp_path, _env(tmp_path), block.name)
        ran += 1
    assert ran


def _slug(heading):
    """The anchor MkDocs (Python-Markdown's toc) gives a heading."""
    text = re.sub(r"[^\w\s-]", "", heading.strip().lower())
    return re.sub(r"[-\s]+", "-", text).strip("-")


def test_the_readme_links_resolve():
    # mkdocs build --strict checks the links of docs/; the README is not
    # part of the site, so its links to the pages are checked here.
    readme = docs_blocks.ROOT / "README.md"
    links = re.findall(r"\]\(([^)\s]+)\)", readme.read_text(encoding="utf-8"))
    local = [link for link in links if not re.match(r"\w+://", link)]
    assert len(local) > 20
    for link in local:
        path, _, anchor = link.partition("#")
        target = docs_blocks.ROOT / path
        assert target.exists(), f"README.md links to {link}: no such file"
        if anchor:
            headings = re.findall(
                r"^#+\s+(.*)$", target.read_text(encoding="utf-8"), re.M
            )
            assert anchor in {
                _slug(h) for h in headings
            }, f"README.md links to {link}: {path} has no such heading"
