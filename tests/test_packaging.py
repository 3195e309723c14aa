"""Shipping files: Dockerfile, .dockerignore, docker-compose.yml, pyproject.toml and the wheel they build.

Offline and quick, no Docker engine: the files are parsed, the flags they pass are resolved by kd itself,
and a wheel is built (without build isolation) from a copy of the sources in a temporary folder.
"""

from __future__ import annotations

import email
import importlib
import importlib.metadata
import inspect
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml

import kd
from kd.flags import resolve

PROJECT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------- helpers


def dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile as (INSTRUCTION, arguments): continuations joined, comments and blank lines dropped."""
    instructions, pending = [], ""
    for line in (PROJECT / "Dockerfile").read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue  # Docker drops these inside a continuation too
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1]
            continue
        keyword, _, args = (pending + line).strip().partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a line continuation"
    return instructions


def words(args: str) -> list[str]:
    """An instruction's arguments: the JSON (exec) form or whitespace-separated words."""
    if args.startswith("["):
        value = json.loads(args)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
        return value
    return shlex.split(args)


def instructions(name: str) -> list[list[str]]:
    return [words(args) for keyword, args in dockerfile() if keyword == name]


def requirement_pins() -> dict[str, str]:
    """``name: version`` for every ``name==version`` line of requirements.txt."""
    return dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (PROJECT / "requirements.txt").read_text(), re.M))


def requirement_names(path: Path) -> set[str]:
    """Normalised project names required by a requirements file (comments and ``-r`` lines skipped)."""
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            names.add(re.split(r"[\s<>=!~;\[]", line, maxsplit=1)[0].lower().replace("_", "-"))
    return names


def ignore_patterns() -> list[str]:
    lines = (PROJECT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _pattern_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern as a regex over slash-separated paths (``**``, ``*``, ``?``, ``[...]``)."""
    out, i = "", 0
    pattern = pattern.strip("/")
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i:end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignored(path: str) -> bool:
    """Whether the build context leaves ``path`` out (a pattern matching a parent folder counts; ``!`` re-includes)."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    ignored = False
    for pattern in ignore_patterns():
        negate = pattern.startswith("!")
        regex = _pattern_regex(pattern.lstrip("!"))
        if any(regex.fullmatch(p) for p in prefixes):
            ignored = not negate
    return ignored


def volume(spec: str) -> tuple[str, str]:
    source, target = spec.split(":")[:2]
    return source, target


# ------------------------------------------------------------------------------------------- Dockerfile


def test_dockerfile_base_image_is_a_cuda_build_of_the_pinned_torch():
    froms = instructions("FROM")
    assert len(froms) == 1, f"one build stage expected, got {froms}"
    image = froms[0][-1]
    assert "cuda" in image.split(":", 1)[-1], f"{image} is not a CUDA-enabled tag"
    if image.startswith("pytorch/pytorch:"):
        version = image.split(":", 1)[1].split("-cuda")[0]
        assert version == requirement_pins()["torch"], f"{image} does not hold the torch pinned in requirements.txt"
    else:
        assert image.startswith("nvidia/cuda:"), f"{image}: expected an official pytorch/pytorch or nvidia/cuda image"


def test_dockerfile_installs_requirements_before_copying_the_code():
    steps = [(keyword, words(args) if keyword == "COPY" else args) for keyword, args in dockerfile()]
    copy_reqs = next(i for i, (k, a) in enumerate(steps) if k == "COPY" and a[:-1] == ["requirements.txt"])
    install = next(i for i, (k, a) in enumerate(steps)
                   if k == "RUN" and "pip install" in a and "-r requirements.txt" in a)
    copy_code = next(i for i, (k, a) in enumerate(steps) if k == "COPY" and any(s.rstrip("/") == "kd" for s in a[:-1]))
    assert copy_reqs < install < copy_code, "copy and install requirements.txt before the code (layer cache)"


def test_dockerfile_copies_paths_that_exist_and_are_in_the_build_context():
    """Every COPY source exists and survives .dockerignore, and the image's WORKDIR mirrors the repository."""
    workdir, image_files = "/", set()
    for keyword, args in dockerfile():
        if keyword == "WORKDIR":
            workdir = str(Path(workdir, args))
        if keyword not in ("COPY", "ADD"):
            continue
        parts = words(args)
        assert not any(a.startswith("--from") for a in parts), "no multi-stage copies expected"
        *sources, dest = [a for a in parts if not a.startswith("--")]
        assert sources, f"{keyword} {args} names no source"
        into_dir = dest.endswith("/") or len(sources) > 1
        dest = Path(workdir, dest)
        for source in sources:
            matches = list(PROJECT.glob(source.rstrip("/")))
            assert matches, f"{keyword} {source}: no such path in the repository"
            for match in matches:
                files = [match] if match.is_file() else [p for p in match.rglob("*")
                                                         if p.is_file() and "__pycache__" not in p.parts]
                for file in files:
                    relative = file.relative_to(PROJECT).as_posix()
                    assert not dockerignored(relative), f"{keyword} {source}: {relative} is excluded by .dockerignore"
                    # a folder's contents land in dest; a file lands in dest/ or is renamed to dest
                    inside = file.relative_to(match) if match.is_dir() else Path(file.name)
                    target = dest / inside if match.is_dir() or into_dir else dest
                    image_files.add(target.as_posix())
    app = Path(workdir)
    needed = ["requirements.txt", "experiment.py", "commandline_args.txt", "kd/cli.py", "kd/losses/__init__.py",
              "configs/imagenette.yaml", "configs/demo.yaml", "scripts/make_digits.py"]
    missing = [name for name in needed if (app / name).as_posix() not in image_files]
    assert not missing, f"not in the image under {app}: {missing}"


def test_dockerfile_runs_experiment_py_writing_to_runs_with_data_and_runs_volumes():
    (entrypoint,) = instructions("ENTRYPOINT")
    assert entrypoint[:2] == ["python", "experiment.py"], entrypoint
    assert entrypoint[2:] == ["--output_dir", "/runs"], entrypoint
    assert all(cmd == [] for cmd in instructions("CMD")), "docker run's arguments should be kd's flags alone"
    volumes = {v for args in instructions("VOLUME") for v in args}
    assert {"/data", "/runs"} <= volumes
    assert "6006" in {p.split("/")[0] for args in instructions("EXPOSE") for p in args}
    (workdir,) = instructions("WORKDIR")
    assert workdir[0].startswith("/")


def compose() -> dict:
    data = yaml.safe_load((PROJECT / "docker-compose.yml").read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data["services"]


def test_docker_run_flags_resolve_to_runs_and_data(monkeypatch: pytest.MonkeyPatch):
    """What the container runs: the entrypoint's flags, then the compose command (or docker run's flags).

    The image's working directory holds commandline_args.txt and configs/ as the repository root does.
    """
    monkeypatch.chdir(PROJECT)
    (entrypoint,) = instructions("ENTRYPOINT")
    base = entrypoint[entrypoint.index("experiment.py") + 1:]
    command = compose()["train"]["command"]
    command = shlex.split(command) if isinstance(command, str) else command
    config = resolve(base + command).config
    assert config.output_dir == "/runs"
    assert config.data_dir.startswith("/data/"), "the dataset must come from the /data volume"
    assert config.train_teacher and config.distill
    # a flag given to docker run comes later on the command line, so it wins
    assert resolve(base + command + ["--output_dir", "/runs/other"]).config.output_dir == "/runs/other"
    # with no flags at all the shipped demo (commandline_args.txt) runs, writing under /runs
    demo = resolve(base)
    assert demo.config.output_dir == "/runs" and demo.sources["data_dir"].startswith("commandline_args.txt")


# ------------------------------------------------------------------------------------------ .dockerignore


def test_dockerignore_keeps_data_runs_checkpoints_and_caches_out_of_the_context():
    for path in ("data", "data/imagenette2-320/train/n01440764/x.JPEG", "runs", "runs/demo/teacher/version_0",
                 "elsewhere/model.ckpt", ".git", ".venv", ".pytest_cache", "kd/__pycache__/cli.cpython-311.pyc"):
        assert dockerignored(path), f"{path} would be sent to the Docker daemon"
    for path in ("requirements.txt", "experiment.py", "kd/cli.py", "kd/losses/__init__.py", "configs/demo.yaml"):
        assert not dockerignored(path), f"{path} is needed by the image"


# --------------------------------------------------------------------------------------- docker-compose


def test_compose_has_a_gpu_train_service_and_a_tensorboard_service():
    services = compose()
    train, board = services["train"], services["tensorboard"]

    build = train["build"]
    assert (build if isinstance(build, str) else build["context"]) in (".", "./")
    assert board["image"] == train["image"], "tensorboard should run the image train builds"
    devices = train["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert train.get("shm_size") or train.get("ipc") == "host", "DataLoader workers need more than 64 MB of /dev/shm"
    mounts = {volume(v) for v in train["volumes"]}
    assert {("./data", "/data"), ("./runs", "/runs")} <= mounts

    entrypoint = board["entrypoint"]
    entrypoint = shlex.split(entrypoint) if isinstance(entrypoint, str) else entrypoint
    assert entrypoint[0] == "tensorboard"
    joined = " ".join(entrypoint)
    assert "--logdir /runs" in joined and "--host 0.0.0.0" in joined and "--port 6006" in joined
    assert "6006:6006" in [str(p) for p in board["ports"]]
    assert ("./runs", "/runs") in {volume(v) for v in board["volumes"]}


# --------------------------------------------------------------------------------------- pyproject.toml


def pyproject() -> dict:
    return tomllib.loads((PROJECT / "pyproject.toml").read_text())


def test_pyproject_metadata_script_and_dynamic_fields():
    data = pyproject()
    assert data["build-system"]["build-backend"] == "setuptools.build_meta"
    project = data["project"]
    assert set(project["dynamic"]) >= {"version", "dependencies"}
    assert project["requires-python"] == ">=3.10"
    dynamic = data["tool"]["setuptools"]["dynamic"]
    assert dynamic["dependencies"]["file"] == ["requirements.txt"]
    assert dynamic["version"]["attr"] == "kd.__version__"

    module, _, name = project["scripts"]["kd"].partition(":")
    main = getattr(importlib.import_module(module), name)
    assert main is importlib.import_module("kd.cli").main and callable(main)
    # a console script calls main() with no arguments and exits with what it returns
    assert all(p.default is not inspect.Parameter.empty for p in inspect.signature(main).parameters.values())

    dev = {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in project["optional-dependencies"]["dev"]}
    in_dev_file = requirement_names(PROJECT / "requirements-dev.txt")
    assert dev == in_dev_file, "the dev extra must list what requirements-dev.txt adds to requirements.txt"


# ------------------------------------------------------------------------------------------------ wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel ``pip wheel`` builds from a copy of what pyproject.toml reads (the repository stays clean)."""
    setuptools = importlib.metadata.version("setuptools")
    assert tuple(int(x) for x in setuptools.split(".")[:2]) >= (70, 1), \
        f"setuptools {setuptools} cannot build wheels without the wheel package: install setuptools>=70.1"
    before = set(os.listdir(PROJECT))
    src, dist = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    data = pyproject()
    requirements = data["tool"]["setuptools"]["dynamic"]["dependencies"]["file"]
    for name in ["pyproject.toml", data["project"]["readme"], *requirements]:
        shutil.copy2(PROJECT / name, src / name)
    for package in sorted(p.name for p in PROJECT.iterdir() if (p / "__init__.py").is_file()):
        shutil.copytree(PROJECT / package, src / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-w", str(dist), str(src)], cwd=src, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    new = set(os.listdir(PROJECT)) - before
    assert not {n for n in new if n in ("build", "dist") or n.endswith(".egg-info")}, f"the build left {new} behind"
    (built,) = dist.glob("*.whl")
    return built


def test_wheel_holds_the_package_entry_point_and_pinned_requirements(wheel: Path):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        metadata = email.message_from_bytes(archive.read(f"{info}/METADATA"))
        entry_points = archive.read(f"{info}/entry_points.txt").decode()
    assert {"kd/__init__.py", "kd/cli.py", "kd/config.py", "kd/losses/__init__.py"} <= set(names)
    assert not [n for n in names if n.endswith(".pyc") or n.startswith(("tests/", "configs/"))]
    assert metadata["Name"] == "kd-distill" and metadata["Version"] == kd.__version__
    assert re.search(r"^\[console_scripts\]\s*\nkd = kd\.cli:main$", entry_points, re.M), entry_points
    requires = [r for r in metadata.get_all("Requires-Dist") if "extra ==" not in r]
    assert f"torch=={requirement_pins()['torch']}" in requires
    assert any(r.startswith("pytorch-lightning") for r in requires), requires
    names_required = {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requires}
    assert names_required == requirement_names(PROJECT / "requirements.txt")


def test_installed_kd_command_runs_the_cli(wheel: Path, tmp_path: Path):
    """The console script from the wheel: outside a checkout no commandline_args.txt is read, inside one it is."""
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(site),
                           str(wheel)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    env = {**os.environ, "PYTHONPATH": str(site)}
    empty = tmp_path / "elsewhere"
    empty.mkdir()

    def kd_command(*args: str, cwd: Path) -> subprocess.CompletedProcess:
        return subprocess.run([str(site / "bin" / "kd"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=60)

    helped = kd_command("--help", cwd=empty)
    assert helped.returncode == 0 and "--train_teacher" in helped.stdout, helped.stderr
    outside = kd_command("--print_config", cwd=empty)
    assert outside.returncode == 0, outside.stderr
    assert all(line.rstrip().endswith(("default", "command line")) for line in outside.stdout.splitlines())
    inside = kd_command("--print_config", cwd=PROJECT)
    assert inside.returncode == 0, inside.stderr
    assert re.search(r"\scommandline_args\.txt:\d+$", inside.stdout, re.M), inside.stdout


@pytest.mark.slow
def test_evaluate_and_export_do_not_set_up_the_report_plotting():
    """--evaluate and --export need tables, not kd/report/comparison.py's matplotlib back-end set-up."""
    code = ("import sys, kd.deploy.metrics, kd.deploy.export, kd.deploy.commands; "
            "assert 'kd.report.comparison' not in sys.modules, 'kd.report.comparison'")
    subprocess.run([sys.executable, "-c", code], cwd=PROJECT, check=True, timeout=120)
