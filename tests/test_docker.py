"""The container and the HPC job scripts (docker/). CI has no Docker daemon, no GPU and no SLURM, so nothing here
builds the image or submits a job; these check what can go wrong without either:

- the Dockerfile parses (BuildKit's own parser, through the `dockerfile` package), its base image is pinned to a
  CUDA 12 RAPIDS tag, everything it COPYs exists and reaches the builder, and it installs docker/requirements.txt
  and then aml-rapids without dependencies;
- docker/requirements.txt keeps pyproject.toml's lower bounds, and pip resolves it (a dry run) to one consistent
  set with CUDA 12 wheels only;
- every job script is valid bash, its #SBATCH lines are read, and every aml-rapids command, option and
  --set key it uses exists (checked against the command line and the config models themselves), as do the
  options it gives `dask scheduler` and `dask cuda worker`.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
DOCKERIGNORE = DOCKER / "Dockerfile.dockerignore"
REQUIREMENTS = DOCKER / "requirements.txt"
SBATCH = sorted((DOCKER / "slurm").glob("*.sbatch"))

# The instructions of the Dockerfile reference; the parser accepts any word, the builder does not.
INSTRUCTIONS = {"ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK", "LABEL",
                "MAINTAINER", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR"}


def _dockerfile():
    import dockerfile  # BuildKit's parser (test extra)

    return dockerfile.parse_file(str(DOCKERFILE))


def _runs() -> list[str]:
    return [" ".join(c.value) for c in _dockerfile() if c.cmd == "RUN"]


# --- the Dockerfile ---------------------------------------------------------------------------------------------


def test_dockerfile_parses_with_known_instructions():
    commands = _dockerfile()
    assert commands, "docker/Dockerfile holds no instructions"
    unknown = [(c.start_line, c.cmd) for c in commands if c.cmd not in INSTRUCTIONS]
    assert not unknown, f"not Dockerfile instructions (line, word): {unknown}"
    assert commands[0].cmd == "FROM", "a Dockerfile without ARGs starts with FROM"


def test_base_image_is_a_pinned_cuda12_rapids_tag():
    froms = [c for c in _dockerfile() if c.cmd == "FROM"]
    assert len(froms) == 1, "one stage: the RAPIDS base image"
    image = froms[0].value[0]
    assert "$" not in image, f"FROM {image}: the tag is written out, not taken from a build argument"
    name, _, tag = image.partition("@")[0].rpartition(":")
    assert name in {"rapidsai/base", "nvcr.io/nvidia/rapidsai/base"}, f"FROM {image}: not an official RAPIDS image"
    assert tag and tag != "latest", f"FROM {image}: no pinned tag"
    # ${RAPIDS_VER}-cuda${CUDA_VER}-py${PYTHON_VER}; CUDA 12 as DALI's cuda120 build and the CUDA 12 torch wheels.
    assert re.fullmatch(r"\d{2}\.\d{2}-cuda12(\.\d+)?-py3\.\d+", tag), f"FROM {image}: not a RAPIDS CUDA 12 tag"


def _ignored(path: str, patterns: list[str]) -> bool:
    """Whether a .dockerignore (these patterns, in order, last match wins) leaves PATH out of the build context:
    enough of Docker's rules for the patterns of docker/Dockerfile.dockerignore (fnmatch per path prefix)."""
    from fnmatch import fnmatch

    parts = Path(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        keep = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        glob = pattern.removeprefix("**/")
        if any(fnmatch(p, pattern) or (glob != pattern and fnmatch(Path(p).name, glob)) for p in prefixes):
            ignored = not keep
    return ignored


def test_every_copy_source_exists_and_reaches_the_builder():
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    copies = [c for c in _dockerfile() if c.cmd in {"COPY", "ADD"}]
    assert copies, "the Dockerfile copies nothing of the project"
    for command in copies:
        assert not any(flag.startswith("--from") for flag in command.flags), command.original
        for source in command.value[:-1]:  # the last value is the destination
            assert (ROOT / source).exists(), f"line {command.start_line}: {source} does not exist in the repository"
            assert not _ignored(source, patterns), f"{source} is left out of the build context by {DOCKERIGNORE.name}"
    # The filter itself: sources pass, what must not be sent does not.
    assert _ignored(".git", patterns) and _ignored("runs", patterns)
    assert _ignored("aml_rapids/__pycache__", patterns)


def test_dockerfile_installs_the_requirements_then_aml_rapids_without_deps():
    commands = _dockerfile()
    copied = {c.value[0]: c.value[-1] for c in commands if c.cmd == "COPY" and len(c.value) == 2}
    assert "docker/requirements.txt" in copied, "docker/requirements.txt is not copied into the image"
    runs = _runs()
    assert any("pip install" in r and f"-r {copied['docker/requirements.txt']}" in r for r in runs), \
        "no RUN installs docker/requirements.txt"
    assert any(re.search(r"pip install\b.*--no-deps", r) for r in runs), \
        "aml-rapids must be installed with --no-deps, or pip may replace the base image's cuML, CuPy, dask-cuda"
    entrypoint = [c for c in commands if c.cmd == "ENTRYPOINT"]
    assert entrypoint and entrypoint[-1].json and entrypoint[-1].value[0] == "aml-rapids"
    env = {}
    for c in commands:
        if c.cmd == "ENV":
            env.update(zip(c.value[::2], c.value[1::2]))
    assert env.get("TORCH_HOME", "").startswith("/weights") and env.get("HF_HOME", "").startswith("/weights")


# --- docker/requirements.txt ------------------------------------------------------------------------------------


def _requirements() -> dict[str, Requirement]:
    reqs = [Requirement(line.split("#")[0].strip()) for line in REQUIREMENTS.read_text().splitlines()
            if line.split("#")[0].strip()]
    return {_canonical(r.name): r for r in reqs}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _bound(req: Requirement, op: str) -> str | None:
    found = [s.version for s in req.specifier if s.operator == op]
    return found[0] if found else None


def test_requirements_keep_pyproject_bounds():
    tomllib = pytest.importorskip("tomllib")
    from packaging.version import Version

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ours = _requirements()
    wanted = [Requirement(d) for d in project["dependencies"]]
    wanted += [Requirement(d) for d in project["optional-dependencies"]["cu12"] if "dali" in d]  # the GPU loader
    for req in wanted:
        name = _canonical(req.name)
        assert name in ours, f"{req.name} (pyproject.toml) is missing from docker/requirements.txt"
        mine = ours[name]
        assert _bound(mine, ">=") == _bound(req, ">="), f"{name}: lower bound {mine} differs from pyproject's {req}"
        if _bound(req, "<"):
            assert _bound(mine, "<") and Version(_bound(mine, "<")) <= Version(_bound(req, "<")), \
                f"{name}: {mine} allows more than pyproject's {req}"
    for name in ("dask-jobqueue", "distributed"):
        assert name in ours, f"{name} is missing from docker/requirements.txt (scale-out)"


@pytest.mark.slow
def test_requirements_resolve_to_cuda12_wheels(tmp_path):
    """pip resolves docker/requirements.txt as the image build does (PyPI only: the Dockerfile uses no other
    index). With this pip and index no package metadata is served apart from the wheels, so the dry run downloads
    every wheel it picks, about 4.6 GB (torch 0.9 GB, cuDNN 0.7 GB, DALI 0.4 GB, ...) into a temporary folder,
    about 35 s here; --no-cache-dir keeps them out of pip's cache. It resolves for the Python running the tests,
    which is the image's (py3.11 in its tag)."""
    report = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--no-cache-dir",
         "--report", str(report), "-r", str(REQUIREMENTS)],
        capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, f"pip could not resolve docker/requirements.txt:\n{done.stderr[-4000:]}"
    resolved = {_canonical(i["metadata"]["name"]): i["metadata"]["version"]
                for i in json.loads(report.read_text())["install"]}
    assert "nvidia-dali-cuda120" in resolved and "torch" in resolved, sorted(resolved)
    # PyPI's torch >= 2.11 brings CUDA 13 (nvidia-*-cu13, cuda-toolkit 13, nvidia-cuda-runtime 13): it would need
    # a newer driver than the CUDA 12 image, and two CUDA runtimes in one process.
    cuda13 = sorted(f"{n}=={v}" for n, v in resolved.items()
                    if n.endswith("-cu13") or (n.startswith(("nvidia-cuda-runtime", "cuda-toolkit"))
                                               and v.split(".")[0] == "13"))
    assert not cuda13, f"CUDA 13 wheels in the CUDA 12 image: {cuda13} (torch {resolved['torch']})"
    assert "nvidia-cuda-runtime-cu12" in resolved, f"torch {resolved['torch']} brings no CUDA 12 runtime"


# --- the SLURM job scripts --------------------------------------------------------------------------------------


def test_there_are_the_three_job_scripts():
    assert {p.name for p in SBATCH} == {"one-node-gpus.sbatch", "multi-node.sbatch", "cohort-array.sbatch"}


@pytest.mark.parametrize("script", SBATCH, ids=lambda p: p.name)
def test_job_script_is_valid_bash_with_its_sbatch_lines_read(script):
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = script.read_text().splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    assert "set -euo pipefail" in lines
    # sbatch reads #SBATCH lines only up to the first command; one after it would be silently ignored.
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.lstrip().startswith("#"))
    late = [i + 1 for i, line in enumerate(lines) if line.startswith("#SBATCH") and i > first_command]
    assert not late, f"#SBATCH lines after the first command (ignored by sbatch): lines {late}"
    assert any(line.startswith("#SBATCH") for line in lines[:first_command])


def _logical_lines(text: str) -> list[str]:
    """The script's commands: continuation lines joined, comment lines dropped."""
    out, pending = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") and not pending:
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append(pending + line)
        pending = ""
    return out


def _commands(script: Path, program: list[str]) -> list[list[str]]:
    """Each call of PROGRAM (e.g. ["aml-rapids"], ["dask", "scheduler"]) in the script: its arguments, up to the
    end of the shell command."""
    found = []
    for line in _logical_lines(script.read_text()):
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|<>")
        lexer.whitespace_split = True
        lexer.commenters = ""
        try:
            tokens = list(lexer)
        except ValueError:  # a line shlex cannot split is no aml-rapids call of ours
            continue
        for i in range(len(tokens) - len(program) + 1):
            if tokens[i:i + len(program)] == program:
                args = []
                for token in tokens[i + len(program):]:
                    if token and token[0] in ";&|<>" or token.startswith("#"):
                        break
                    args.append(token)
                found.append(args)
    return found


def _options(command) -> set[str]:
    return {o for p in command.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")}


def _defaults(script: Path) -> dict[str, str]:
    """The script's settings written NAME=${NAME:-default}, with a default free of other variables."""
    found = re.findall(r"^(\w+)=\$\{(\w+):-([^}$]*)\}$", script.read_text(), flags=re.M)
    return {name: default for name, same, default in found if name == same}


def _substitute(value: str, defaults: dict[str, str]) -> str:
    """A shell variable in a --set value: its default in the script (CONNECT_S=${CONNECT_S:-300} is 300), else a
    path (SCHED, the scheduler file)."""
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: defaults.get(m[1], "/shared/placeholder"), value)


@pytest.mark.parametrize("script", SBATCH, ids=lambda p: p.name)
def test_job_script_uses_real_commands_options_and_config_keys(script):
    import typer

    from aml_rapids.cli import app
    from aml_rapids.config import load_config

    cli = typer.main.get_command(app)
    defaults = _defaults(script)
    calls = _commands(script, ["aml-rapids"])
    assert calls, f"{script.name} runs no aml-rapids command"
    for args in calls:
        name, rest = args[0], args[1:]
        assert name in {"index", "split", "extract", "train", "evaluate", "run", "weights"}, f"aml-rapids {name}"
        assert name in cli.commands, f"aml-rapids has no command {name}"
        command = cli.commands[name]
        if name == "weights":
            name, rest = f"weights {rest[0]}", rest[1:]
            command = command.commands[name.split()[1]]
        unknown = [a for a in rest if a.startswith("-") and a not in _options(command)]
        assert not unknown, f"{script.name}: aml-rapids {name} has no option {unknown}"
        overrides = [_substitute(rest[i + 1], defaults) for i, a in enumerate(rest) if a == "--set"]
        for item in overrides:
            assert item.startswith("scale."), f"{script.name}: --set {item}: the job scripts set only scale.*"
        load_config(overrides=overrides)  # ConfigError on an unknown key or a bad value


def test_multi_node_script_runs_a_cluster_of_real_dask_options():
    script = DOCKER / "slurm" / "multi-node.sbatch"
    scheduler_cli = pytest.importorskip("distributed.cli.dask_scheduler")
    worker_cli = pytest.importorskip("distributed.cli.dask_worker")
    try:  # dask-cuda's own command line where it is installed; else the options it shares with `dask worker`
        from dask_cuda.cli import worker as cuda_worker
    except ImportError:
        cuda_worker = worker_cli.main
    (scheduler,) = _commands(script, ["dask", "scheduler"])
    (worker,) = _commands(script, ["dask", "cuda", "worker"])
    for args, command in ((scheduler, scheduler_cli.main), (worker, cuda_worker)):
        unknown = [a for a in args if a.startswith("-") and a not in _options(command)]
        assert not unknown, f"no such option {unknown}"
        assert "--scheduler-file" in args
    # The clients join the scheduler of that very file.
    for args in _commands(script, ["aml-rapids"]):
        if args[0] in {"extract", "train"}:
            assert "scale.cluster=scheduler-file" in args and "scale.scheduler_file=$SCHED" in args, args
