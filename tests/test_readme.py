"""The README is short and every command in it runs as written.

- Every line of its ```bash blocks is a command this file knows how to check, and it is
  checked: `make X` names a target of the Makefile (the targets themselves are the test suite
  and the benchmark, too long to run here); `pip install 'protoknn-plugin[X]'` names this
  package and an extra of pyproject.toml (installing needs the network); `protoknn ...` runs
  for real, on a small image folder named as in the README.
- Every `protoknn COMMAND --option` anywhere in it (tables and inline code too) names a real
  command and real options of that command, and the commands that need no input run.
- Its Python example runs (on a small slice of the data), and its links lead to files and
  headings that exist.
"""
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from protoknn_plugin.cli import cli

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
TEXT = README.read_text()
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def bash_commands(text=TEXT):
    """Every command of the ```bash blocks: continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


def mentions(text=TEXT):
    """Every `protoknn COMMAND ...` span of inline code or a bash line, as words."""
    spans = re.findall(r"`(protoknn [^`]+)`", text)
    spans += [shlex.join(words) for words in bash_commands(text) if words[0] == "protoknn"]
    return [span.replace("\\|", "|").split() for span in spans]


def test_readme_has_at_most_200_lines():
    assert len(TEXT.splitlines()) <= 200


def test_every_bash_command_is_one_this_test_checks():
    kinds = {"make", "pip", "protoknn"}
    assert {words[0] for words in bash_commands()} <= kinds
    assert {words[0] for words in bash_commands()} == kinds  # each kind below is exercised


def test_make_commands_name_targets_of_the_makefile():
    makefile = (REPO / "Makefile").read_text()
    targets = {m.group(1) for m in re.finditer(r"^([a-z][\w-]*):", makefile, re.M)}
    asked = [words[1:] for words in bash_commands() if words[0] == "make"]
    assert asked and all(len(a) == 1 and a[0] in targets for a in asked), (asked, targets)
    assert {"bench", "test"} <= {a[0] for a in asked}


def test_pip_commands_name_this_package_and_its_extras():
    name = PYPROJECT["project"]["name"]
    extras = set(PYPROJECT["project"]["optional-dependencies"])
    asked = [words for words in bash_commands() if words[0] == "pip"]
    assert asked
    for words in asked:
        assert words[1] == "install" and len(words) == 3, words
        match = re.fullmatch(rf"{re.escape(name)}(?:\[(\w+)\])?", words[2])
        assert match, words
        assert match.group(1) is None or match.group(1) in extras, words


def test_every_protoknn_command_mentioned_exists_with_its_options():
    spans = mentions()
    assert len(spans) >= 12
    for words in spans:
        command = cli.commands.get(words[1])
        assert command is not None, f"README names `protoknn {words[1]}`, which does not exist"
        options = {opt for param in command.params for opt in param.opts + param.secondary_opts}
        for word in words[2:]:
            flag = word.split("=")[0]
            if flag.startswith("--"):
                assert flag in options, f"`protoknn {words[1]}` has no option {flag}"


def test_every_command_in_the_table_has_help_and_the_listings_run():
    runner = CliRunner()
    table = {words[1] for words in mentions()}
    assert table == set(cli.commands), "the command table lists every command"
    for name in sorted(table):
        result = runner.invoke(cli, [name, "--help"])
        assert result.exit_code == 0 and "Usage: " in result.output, (name, result.output)
    for words in mentions():
        if len(words) == 2 and words[1] in ("datasets", "backbones", "heads"):
            result = runner.invoke(cli, words[1:])
            assert result.exit_code == 0, (words, result.output)
            assert "animals" in result.output or "small-cnn" in result.output or "protoknn" in result.output


def _image_folder(root: Path, classes=10, per_class=16):
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (28, 28), (25 * c, 10 * i, 50)).save(folder / f"{i}.png")


def test_own_image_folder_commands_run_as_written(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch", reason="the pretrained extra is not installed")
    commands = [words for words in bash_commands() if words[0] == "protoknn"]
    assert [words[1] for words in commands] == ["train", "explain", "benchmark"]
    data = commands[0][commands[0].index("--data-dir") + 1]
    # the smallest folder the README's text allows: "at least 10 classes of 16 images"
    assert "at least 10 classes of 16 images" in " ".join(TEXT.split())
    _image_folder(tmp_path / data)
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200", PROTOKNN_CACHE=str(tmp_path / "cache"))
    for words in commands:
        done = subprocess.run([sys.executable, "-m", "protoknn_plugin", *words[1:]], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, (words, done.stderr[-2000:])
        out = Path(tmp_path, words[words.index("--out") + 1])
        assert out.exists(), words
    assert (tmp_path / commands[0][commands[0].index("--out") + 1] / "checkpoint.pt").is_file()
    assert (tmp_path / commands[2][commands[2].index("--out") + 1] / "results.md").is_file()


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", ["README.md", "docs/results.md", "docs/history.md", "docs/development.md",
                                  "docs/datasets.md", "docs/cabrnet.md"])
def test_links_lead_to_files_and_headings_that_exist(page):
    path = REPO / page
    for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
        if target.startswith(("http://", "https://")):
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        assert linked.exists(), f"{page} links to {target}, which does not exist"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", linked.read_text(), re.M)
            assert anchor in {_slug(h) for h in headings}, f"{page} links to {target}: no such heading"


def test_own_training_loop_example_runs():
    section = TEXT.split("## Use a head in your own training loop", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert 'create_dataset("animals")' in code
    code = code.replace('create_dataset("animals")', 'create_dataset("animals", limit=120)')
    code = code.replace("num_prototypes=100, dim=64", "num_prototypes=12, dim=8, backbone_options={'width': 4}")
    code = code.replace("print(", "result = (")
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    preds = namespace["result"]
    assert set(preds) == {"k=1", "k=3", "k=5", "k=10"}
    assert all(p.shape == (120,) for p in preds.values())
    assert namespace["model"].projection is not None
