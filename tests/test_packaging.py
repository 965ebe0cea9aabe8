"""`pip install` into fresh virtual environments gives what each install promises, and nothing heavy besides."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

SOURCES = ("pyproject.toml", "README.md", "LICENSE", "artefact", "service", "training")


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's sources alone, as an sdist holds them (no venv, runs or build leftovers)."""
    root = tmp_path_factory.mktemp("source") / "valley"
    root.mkdir()
    for name in SOURCES:
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy2)(REPO / name, root / name)
    return root


def _fresh_install(tmp_path: Path, requirement: str) -> Path:
    """A new venv with `requirement` installed; its python."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    installed = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                                requirement], capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return python


def _importable(python: Path, module: str) -> bool:
    probe = f"import importlib.util, sys; sys.exit(0 if importlib.util.find_spec({module!r}) else 1)"
    return subprocess.run([str(python), "-c", probe], timeout=60).returncode == 0


def test_plain_install_reads_artefacts_without_heavy_dependencies(source: Path, tmp_path: Path) -> None:
    python = _fresh_install(tmp_path, str(source))
    imports = ("import artefact.manifest, artefact.calibration, artefact.uncertainty; "
               "artefact.manifest.load_manifest; print('ok')")
    check = subprocess.run([str(python), "-c", imports], capture_output=True, text=True, timeout=60)
    assert check.stdout.strip() == "ok", check.stderr
    for heavy in ("torch", "onnxruntime", "grpc", "tritonclient"):
        assert not _importable(python, heavy), f"a plain install pulled in {heavy}"
    assert (python.parent / "valley-serve").is_file() and (python.parent / "valley-reload").is_file()


def test_client_extra_alone_runs_the_client_example(source: Path, tmp_path: Path) -> None:
    python = _fresh_install(tmp_path, f"{source}[client]")
    for module in ("tritonclient.grpc", "numpy", "tqdm"):
        assert _importable(python, module), module
    for heavy in ("torch", "onnxruntime"):
        assert not _importable(python, heavy), f"the client extra pulled in {heavy}"
    example = subprocess.run([str(python), str(REPO / "examples" / "classify.py"), "--help"], capture_output=True,
                             text=True, timeout=60)
    assert example.returncode == 0 and "--url" in example.stdout, example.stderr


def test_the_gpu_check_script_parses_and_uses_flags_that_exist() -> None:
    """benchmarks/gpu_check.sh runs only where a GPU is: here its syntax and the flags it passes are checked."""
    script = REPO / "benchmarks" / "gpu_check.sh"
    syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert syntax.returncode == 0, syntax.stderr
    text = script.read_text()
    helps = {command: subprocess.run([sys.executable, *command.split(), "--help"], cwd=REPO, capture_output=True,
                                     text=True, timeout=120).stdout
             for command in ("-m training.cli train", "-m training.cli fge", "-m training.cli export",
                             "benchmarks/ensemble_cost.py", "-m service.cli")}
    for flag in ("--precision", "--overwrite"):
        assert flag in text and flag in helps["-m training.cli export"]
    for flag in ("--device", "--scenarios", "--configs", "--valley-arg", "--json", "--plot"):
        assert flag in text and flag in helps["benchmarks/ensemble_cost.py"]
    assert "--save-epoch" in helps["-m training.cli train"] and "--start-epoch" in helps["-m training.cli fge"]
    for flag in ("--max-batch-size", "--max-queue-delay-ms", "--load-models", "--device"):
        assert flag in helps["-m service.cli"]
