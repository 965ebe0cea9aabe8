"""The packages' boundaries: training and service never import each other; service and artefact import no torch.

Two checks, because either alone can miss something: every import statement of every module
(also those inside functions, which run only on some paths), and what importing every module
really pulls into a fresh interpreter.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGES = ("artefact", "service", "training")
# What each package must never import, directly or through anything it imports.
FORBIDDEN = {
    "artefact": {"service", "training", "torch", "torchvision", "grpc", "onnxruntime", "prometheus_client"},
    "service": {"training", "torch", "torchvision"},
    "training": {"service", "grpc"},
}


def _modules(package: str) -> list[Path]:
    return sorted(path for path in (REPO / package).rglob("*.py") if "_proto" not in path.parts)


def _imported(path: Path) -> set[str]:
    """Top-level names of every module `path` imports, anywhere in the file."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", PACKAGES)
def test_no_module_names_a_forbidden_import(package: str) -> None:
    modules = _modules(package)
    assert len(modules) > 3, f"no modules found under {package}/"
    offending = {str(path.relative_to(REPO)): sorted(_imported(path) & FORBIDDEN[package]) for path in modules}
    assert not {path: names for path, names in offending.items() if names}


@pytest.mark.parametrize("package", PACKAGES)
def test_importing_every_module_pulls_in_nothing_forbidden(package: str) -> None:
    names = [".".join(path.relative_to(REPO).with_suffix("").parts) for path in _modules(package)]
    names = [name.removesuffix(".__init__") for name in names]
    code = (f"import importlib, json, sys\nfor name in {names!r}:\n    importlib.import_module(name)\n"
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    loaded = set(json.loads(result.stdout.splitlines()[-1]))
    assert package in loaded and not loaded & FORBIDDEN[package], sorted(loaded & FORBIDDEN[package])


# The serving package's rooms, and the rooms each must never import (the composition root, service.server, and
# the command line, service.cli, import everything; nothing imports them).
ROOMS = {
    "service.core": {"service.control", "service.transport", "service.observe", "service.server", "service.cli"},
    "service.control": {"service.transport", "service.observe", "service.server", "service.cli"},
    "service.feedback": {"service.control", "service.transport", "service.observe", "service.server", "service.cli"},
    "service.observe": {"service.transport", "service.server", "service.cli"},
    "service.transport": {"service.observe", "service.server", "service.cli"},
}


def _service_imports(path: Path) -> set[str]:
    """The service modules `path` imports, dotted, anywhere in the file."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.startswith("service"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("service"):
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("room", ROOMS)
def test_each_room_of_the_service_imports_only_what_it_may(room: str) -> None:
    modules = sorted((REPO / room.replace(".", "/")).rglob("*.py"))
    assert len(modules) >= 3, f"no modules found in {room}"
    offending = {str(path.relative_to(REPO)): sorted(name for name in _service_imports(path)
                                                      if any(name == f or name.startswith(f + ".")
                                                             for f in ROOMS[room]))
                 for path in modules}
    assert not {path: names for path, names in offending.items() if names}


def test_the_service_package_is_rooms_and_a_root() -> None:
    """Nothing but the rooms, the protocols and a few shared modules sits at the top of service/."""
    top = sorted(path.stem for path in (REPO / "service").glob("*.py"))
    assert top == ["__init__", "cli", "errors", "launch", "server", "settings"], top
    assert sorted(path.name for path in (REPO / "service").iterdir() if path.is_dir() and path.name != "__pycache__") \
        == ["_proto", "control", "core", "feedback", "observe", "transport"]
