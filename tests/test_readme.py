"""The README is executable: every command in its code blocks runs as written, or is skipped with its reason.

Commands run in README order in one working folder (a later command reads what an earlier one wrote, such
as the demo's teacher), in-process through ``kd.cli.main``, with a tiny override that keeps their meaning:
one epoch of 16 px images of the tiny generated dataset. A command that needs what this machine cannot have (a dataset
download, a GPU, Docker) has its flags checked with ``--print_config`` and is then skipped, its reason
shown. In a ``console`` block, ``$ command`` lines are followed by what kd prints: every ``error: ...``
line must be what kd prints for that command, word for word.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kd.cli import main

README = Path(__file__).resolve().parent.parent / "README.md"
# One epoch of 16 px crops of the tiny dataset (the 12 demo classes, 9 images each): a command's flags
# otherwise as written. A command quoted with its error gets the tiny data alone, so the error reads as quoted.
TINY = ["--epochs", "1", "--image_size", "16", "--batch_size", "16", "--num_workers", "0"]

# Commands that are not kd's, each with why the test does not run it.
NOT_KD = {
    "python3 -m venv": "creates a virtual environment: the tests run in one",
    ". ": "activates a virtual environment: the tests run in one",
    "pip install": "installs packages from the network",
    "python -m pytest": "the test suite itself",
    "python scripts/make_digits.py": "needs scikit-learn, which kd does not depend on",
    "python scripts/reproduce.py": "trains a CIFAR-100 row (a download); tests/test_reproduce.py runs it on fake data",
    "docker": "needs Docker and an NVIDIA GPU",
    "torchrun": "needs two machines with eight GPUs each",
    "tensorboard": "starts a web server",
    "sudo": "sets up a PostgreSQL server",
}
# kd commands that cannot run here as written: their flags are checked with --print_config, then skipped.
CANNOT_RUN = {
    "configs/imagenette.yaml": "needs Imagenette in data/ (and a GPU for its bf16 precision)",
    "torchvision:CIFAR100": "downloads CIFAR-100 and needs RepDistiller's released teacher",
    "configs/cifar100/": "trains on CIFAR-100 (a download) for 240 epochs",
    "postgresql://": "needs a PostgreSQL server shared by the machines",
}
# kd commands whose training is not the point here (they repeat a README figure over several seeds, or a
# run made above): their flags are checked with --print_config, then skipped, to keep the suite's time.
NOT_TRAINED = {
    "--seed 0": "the demo again, run above as `python experiment.py`",
    "--experiment_name seed1": "a second demo teacher, only for the ensemble below",
    "--experiment_name ensemble": "an ensemble over three seeds; tests/test_ensemble.py trains ensembles",
    "configs/digits.yaml": "the digits figures over three seeds (needs make_digits.py, hence scikit-learn)",
    "--report runs/digits": "reports the digits runs above, which are not trained here",
    "--config configs/demo.yaml": "the demo again, as a preset, run above as `python experiment.py`",
}


@dataclass
class Command:
    """One command from a README code block, with the line it is on and the errors quoted after it."""

    line: int
    tokens: list[str]
    errors: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return shlex.join(self.tokens)

    def kd_argv(self) -> list[str] | None:
        """The flags of a ``python experiment.py ...`` or ``kd ...`` command; None for another program."""
        if self.tokens[:2] == ["python", "experiment.py"]:
            return self.tokens[2:]
        return self.tokens[1:] if self.tokens[0] == "kd" else None


def _blocks(text: str) -> list[tuple[str, int, list[str]]]:
    """Each fenced code block: its language, the line of its first content line, its lines unindented."""
    found = []
    for match in re.finditer(r"^( *)```(\w*)\n(.*?)^\1```", text, re.MULTILINE | re.DOTALL):
        indent = len(match.group(1))
        first = text.count("\n", 0, match.start(3)) + 1
        found.append((match.group(2), first, [line[indent:] for line in match.group(3).splitlines()]))
    return found


def _split(command: str, line: int) -> list[Command]:
    """A shell line as commands: comments dropped, ``&&`` chains taken apart."""
    commands, current = [], []
    for token in [*shlex.split(command, comments=True), "&&"]:
        if token == "&&":
            commands += [Command(line, current)] if current else []
            current = []
        else:
            current.append(token)
    return commands


def readme_commands(text: str) -> list[Command]:
    """Every command of the README's bash and console blocks, in order, with the errors a console block quotes."""
    commands: list[Command] = []
    for language, first, lines in _blocks(text):
        if language == "bash":
            joined, start = "", first
            for number, line in enumerate(lines, start=first):
                start = number if not joined else start
                joined += line.removesuffix("\\") + " " if line.endswith("\\") else line
                if not line.endswith("\\"):
                    commands += _split(joined, start)
                    joined = ""
        elif language == "console":
            for number, line in enumerate(lines, start=first):
                if line.startswith("$ "):
                    commands += _split(line[2:], number)
                elif line.startswith("error: "):
                    commands[-1].errors.append(line)
    return commands


COMMANDS = readme_commands(README.read_text())


def _reason(command: Command, table: dict[str, str]) -> str | None:
    """Why ``table`` lists ``command``: a NOT_KD entry starts the command, the other tables' appear in it."""
    found = command.text.startswith if table is NOT_KD else command.text.__contains__
    return next((why for key, why in table.items() if found(key)), None)


def test_every_quoted_error_follows_the_command_that_prints_it():
    """An ``error:`` line outside a console block after its command would go unchecked."""
    quoted = [line.strip() for line in README.read_text().splitlines() if line.strip().startswith("error: ")]
    assert quoted and quoted == [error for command in COMMANDS for error in command.errors]


def test_the_readme_commands_are_found():
    texts = [command.text for command in COMMANDS]
    assert "python experiment.py" in texts and "kd --help" in texts
    assert any("--kd_loss kl_softmax at" in text for text in texts)
    assert all(command.kd_argv() is not None or _reason(command, NOT_KD) for command in COMMANDS), \
        [c.text for c in COMMANDS if c.kd_argv() is None and not _reason(c, NOT_KD)]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder every README command runs in, with the README's own loss file written into it."""
    folder = tmp_path_factory.mktemp("readme")
    code = README.read_text().split("```python\n# my_losses.py\n", 1)[1].split("```", 1)[0]
    (folder / "my_losses.py").write_text(code)
    return folder


def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS, ids=[f"L{c.line} {c.text[:60]}" for c in COMMANDS])
def test_readme_command(command: Command, workspace: Path, tiny_data: Path, monkeypatch, capsys):
    argv = command.kd_argv()
    if argv is None:
        pytest.skip(f"not a kd command: {_reason(command, NOT_KD)}")
    monkeypatch.chdir(workspace)
    argv = [arg.replace("$PWD", str(workspace)) for arg in argv]
    skipped = _reason(command, CANNOT_RUN) or _reason(command, NOT_TRAINED)
    if skipped:
        assert main([*argv, "--print_config"]) == 0, capsys.readouterr().err
        pytest.skip(f"flags checked with --print_config; not run: {skipped}")
    before = _files(workspace)
    code = main([*argv, "--data_dir", str(tiny_data), *([] if command.errors else TINY)])
    err = capsys.readouterr().err
    if command.errors:
        expected = [error.replace("$PWD", str(workspace)) for error in command.errors]
        assert (code, err.splitlines()) == (2, expected)
        assert _files(workspace) == before  # a refused run writes nothing, not even an empty experiment folder
    else:
        assert code == 0, err
        assert [line for line in err.splitlines() if not line.startswith("warning: ")] == []
