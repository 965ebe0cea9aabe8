"""SIGKILL `valley-train train`, `fge`, `sse`, `distill` and `export` at random moments, resume, and get an
uninterrupted run's result.

Each command first runs once uninterrupted and timed: the reference. Then it runs again in fresh
directories, killed at moments of the reference's timeline drawn from a seeded generator (one in
each equal slice of it, earliest first) and resumed (`--resume`; an export is simply run again)
until it finishes; one run takes several kills. A resumed run is killed where the reference was at
that moment: its start-up, plus the time the reference took from the epoch it resumes after. The
first 80 % of the start-up (importing torch, loading the data: nothing is written, and a kill there
is a run that never started) is left out of the draws. Every second kill waits after its delay
until the process holds a file in its output open (/proc/PID/fd), then up to 10 ms more, so that
many kills land inside a checkpoint write or between two, windows of milliseconds that a timer
alone would rarely hit.

After every kill, whatever a reader can find is whole: every checkpoint and snapshot loads and
equals the reference's of the same epoch, every kept checkpoint up to the last one is there, and
an exported version is either absent or complete. The files a kill leaves half-written (hidden
temporaries, an export's staging folder) are then filled with garbage, so a resume that read one
would fail or diverge. At the end every tensor of every checkpoint and snapshot (weights, momentum,
RNG states) is bit-equal to the reference's, no temporary is left, and the exported graphs have the
reference's sha256.

`pytest -m long tests/test_crash_resume.py -s` kills each command 25 times and prints where the kills landed.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from artefact.manifest import MANIFEST_FILE, load_manifest, sha256_of, verify_files
from tests.conftest import REPO, cli
from training import checkpoint
from training.config import ExportConfig
from training.errors import UsageError
from training.export.ensemble import export_ensemble

SEED = 1729
SHORT_KILLS = 3
LONG_KILLS = 25
# One thread: two spinning OpenMP threads slow down tenfold whenever another process wants a core, and the
# timings the kills are drawn from would mean little.
ENVIRONMENT = {"OMP_NUM_THREADS": "1"}

# Kept checkpoints at epochs 3 (--save-epoch), 6 (80 %, where FGE starts) and 8 (the end).
TRAIN = ("train", "--dataset", "synthetic", "--epochs", "8", "--save-epoch", "3", "--seed", "3")
# Epochs 7-10 in two 2-epoch cycles: the snapshot falls on the first step of each cycle's second epoch.
FGE = ("fge", "--cycles", "2", "--cycle-epochs", "2", "--lr1", "0.05", "--lr2", "0.005")
EXPORT = ("export", "--name", "synth", "--version", "1", "--overwrite")
# A snapshot ensemble of 3 cycles of 2 epochs, and a 6-epoch student of the FGE run (its teacher).
SSE = ("sse", "--dataset", "synthetic", "--epochs", "6", "--cycles", "3", "--seed", "3")
DISTILL = ("distill", "--epochs", "6", "--temperature", "2", "--seed", "3")
# Wall-clock values, the only things a resumed run may write differently.
TIMINGS = frozenset({"seconds", "train_seconds_this_process", "train_seconds_total", "evaluation_seconds", "created"})
KILLED_EXPORT = re.compile(r"\.(staging|retired)-1-[0-9a-f]{12}")
PROC = Path("/proc/self/fd")
# A checkpoint of the synthetic runs' network takes 3-16 ms to write and flush here.
IN_WRITE = 0.010


@dataclass(frozen=True)
class Reference:
    """An uninterrupted run: its output, its wall time, when its first file appeared and each epoch ended."""

    out: Path
    seconds: float
    first_write: float
    epochs_ended: tuple[float, ...]

    def kill_points(self, kills: int, rng: random.Random) -> list[float]:
        """Moments of this run, one drawn in each of `kills` equal slices of it (most of start-up left out).

        Latest first: popped, they take a run that resumes after each kill a little further each time.
        """
        low = 0.8 * self.first_write
        return [low + (self.seconds - low) * (part + rng.random()) / kills for part in reversed(range(kills))]

    def delay(self, moment: float, epochs_done: int) -> float:
        """How long after its start to kill a run that resumes after `epochs_done` epochs, to kill it at `moment`.

        A resumed run starts up as this one did, then carries on from where this one ended that epoch. A moment
        it has already passed becomes the end of its start-up, where it reads its checkpoint.
        """
        if epochs_done == 0 or moment <= self.first_write or not self.epochs_ended:
            return moment
        resumed_from = self.epochs_ended[min(epochs_done, len(self.epochs_ended)) - 1]
        return max(0.8 * self.first_write, self.first_write + moment - resumed_from)


def _command(args: tuple[str | Path, ...]) -> list[str]:
    return [sys.executable, "-m", "training.cli", *map(str, args)]


def _environment() -> dict[str, str]:
    return {**os.environ, **ENVIRONMENT}


def _timed(args: tuple[str | Path, ...], out: Path) -> Reference:
    """Run `valley-train ARGS` to the end, noting when `out` first holds a file and when each epoch ended."""
    log = out.parent / f"{out.name}.stderr"
    last = out / "checkpoints" / "last.pt"
    first_write: float | None = None
    epochs_ended: list[float] = []
    last_version: tuple[int, int] | None = None
    started = time.monotonic()
    with open(log, "w") as stderr:
        process = subprocess.Popen(_command(args), cwd=REPO, env=_environment(), stdout=subprocess.DEVNULL,
                                   stderr=stderr)
        while process.poll() is None:
            now = time.monotonic() - started
            if first_write is None and out.is_dir() and any(out.iterdir()):
                first_write = now
            try:
                stat = last.stat()  # every epoch renames a new file over it
                version: tuple[int, int] | None = (stat.st_ino, stat.st_mtime_ns)
            except FileNotFoundError:
                version = None
            if version != last_version:
                epochs_ended.append(now)
                last_version = version
            time.sleep(0.005)
    seconds = time.monotonic() - started
    assert process.returncode == 0, f"valley-train {' '.join(map(str, args))} failed:\n{log.read_text()}"
    return Reference(out, seconds, first_write if first_write is not None else seconds / 2, tuple(epochs_ended))


@pytest.fixture(scope="module")
def train_reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    out = tmp_path_factory.mktemp("reference") / "train"
    return _timed((*TRAIN, "--out", out), out)


@pytest.fixture(scope="module")
def fge_reference(train_reference: Reference, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    out = tmp_path_factory.mktemp("reference") / "fge"
    return _timed((*FGE, "--from", train_reference.out, "--out", out), out)


@pytest.fixture(scope="module")
def sse_reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    out = tmp_path_factory.mktemp("reference") / "sse"
    return _timed((*SSE, "--out", out), out)


@pytest.fixture(scope="module")
def distill_reference(fge_reference: Reference, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    out = tmp_path_factory.mktemp("reference") / "distill"
    return _timed((*DISTILL, "--teacher", fge_reference.out, "--out", out), out)


@pytest.fixture(scope="module")
def export_reference(fge_reference: Reference, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    repository = tmp_path_factory.mktemp("reference") / "repository"
    return _timed((*EXPORT, "--from", fge_reference.out, "--out", repository), repository)


# --------------------------------------------------------------------------- killing


@dataclass(frozen=True)
class Attempt:
    """One run of the command: its process id, when it started (wall clock), and its seconds if it finished."""

    pid: int
    started: float
    took: float | None


def _attempt(args: tuple[str | Path, ...], delay: float, log: Path,
             writing: Callable[[int], bool] | None = None, then: float = 0.0) -> Attempt:
    """Run `valley-train ARGS` and SIGKILL it after `delay` seconds, unless it finishes first.

    With `writing`, the kill waits after the delay until `writing(pid)` says the process is in a write, and
    `then` seconds more.
    """
    started, wall = time.monotonic(), time.time()
    with open(log, "w") as stderr:
        process = subprocess.Popen(_command(args), cwd=REPO, env=_environment(), stdout=subprocess.DEVNULL,
                                   stderr=stderr)
        try:
            process.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            if writing is not None:
                while process.poll() is None and not writing(process.pid):
                    time.sleep(0.0005)
                time.sleep(then)
            process.send_signal(signal.SIGKILL)
            process.wait()
    if process.returncode == -signal.SIGKILL:
        return Attempt(process.pid, wall, None)
    assert process.returncode == 0, f"valley-train {' '.join(map(str, args))} failed:\n{log.read_text()}"
    return Attempt(process.pid, wall, time.monotonic() - started)


def _opened_under(out: Path) -> Callable[[int], bool]:
    """Whether process `pid` holds a file or folder under `out` open: it is writing (or reading) one there."""
    folder = str(out.resolve())
    prefix = f"{folder}{os.sep}"

    def opened(pid: int) -> bool:
        descriptors = Path(f"/proc/{pid}/fd")
        try:
            targets = [os.readlink(descriptor) for descriptor in descriptors.iterdir()]
        except OSError:  # the process is gone, or closed a descriptor while we listed them
            return False
        return any(target.startswith(prefix) or target == folder for target in targets)

    return opened


GARBAGE = b"half a checkpoint"


def _poison_leftovers(out: Path) -> int:
    """Fill what a killed writer left under a hidden name with garbage; returns how many new such files."""
    if not out.is_dir():
        return 0
    leftovers = [path for path in out.rglob("*") if path.is_file()
                 and any(part.startswith(".") for part in path.relative_to(out).parts)
                 and path.read_bytes() != GARBAGE]
    for path in leftovers:
        path.write_bytes(GARBAGE)
    return len(leftovers)


@dataclass(frozen=True)
class Kill:
    run: int
    moment: float
    reached: str
    leftovers: int


def crash_until_done(
    reference: Reference,
    kills: int,
    rng: random.Random,
    work: Path,
    args: Callable[[Path, bool], tuple[str | Path, ...]],
    after_kill: Callable[[Path, Attempt], str],
    finished: Callable[[Path], None],
    epochs_done: Callable[[Path], int] = lambda out: 0,
) -> list[Kill]:
    """Kill runs of `args(out, resumed)` `kills` times in all, resuming a run after each kill until it is done.

    `after_kill` checks what a kill left and says how far the run got; `finished` checks a run that is done;
    `epochs_done` says where a killed run resumes. A run that finishes before its next kill makes that kill a
    fresh run's; the last run is resumed to its end without a kill. Every second kill waits after its delay
    until the process holds a file under `out` open, where Linux shows it (/proc), and lands up to `IN_WRITE`
    later: inside that write, or just after it, or in the next one.
    """
    moments = reference.kill_points(kills, rng)
    landed: list[Kill] = []
    run = 0
    while moments:
        out = work / f"run-{run}"
        resumed = finished_alone = False
        while moments and not finished_alone:
            moment = moments.pop()
            delay = reference.delay(moment, epochs_done(out))
            in_write = _opened_under(out) if len(landed) % 2 == 1 and PROC.is_dir() else None
            attempt = _attempt(args(out, resumed), delay, work / "stderr.txt", in_write, rng.uniform(0, IN_WRITE))
            if attempt.took is None:
                landed.append(Kill(run, moment, after_kill(out, attempt), _poison_leftovers(out)))
                resumed = True
            else:
                # A fresh run gets this moment; one that a fresh run outlasted is drawn again within its time.
                finished_alone = True
                moments.append(moment if resumed else rng.uniform(0.8 * reference.first_write, attempt.took))
        if not finished_alone:
            cli(*args(out, True), env=ENVIRONMENT)
        finished(out)
        run += 1
    return landed


# --------------------------------------------------------------------------- what a reader finds


def _assert_same(ours: Any, theirs: Any, where: str) -> None:
    """Equal values and bit-equal tensors, wall-clock timings aside."""
    if isinstance(theirs, dict):
        assert isinstance(ours, dict) and ours.keys() == theirs.keys(), f"{where}: other keys"
        for key in theirs:
            if key not in TIMINGS:
                _assert_same(ours[key], theirs[key], f"{where}.{key}")
    elif isinstance(theirs, list | tuple):
        assert isinstance(ours, type(theirs)) and len(ours) == len(theirs), f"{where}: other length"
        for index, (mine, its) in enumerate(zip(ours, theirs, strict=True)):
            _assert_same(mine, its, f"{where}[{index}]")
    elif isinstance(theirs, torch.Tensor):
        assert isinstance(ours, torch.Tensor) and ours.dtype == theirs.dtype and torch.equal(ours, theirs), \
            f"{where}: tensors differ"
    else:
        assert ours == theirs, f"{where}: {ours!r} != {theirs!r}"


def _files(out: Path) -> list[str]:
    """Every file under `out`, hidden ones included."""
    return sorted(str(path.relative_to(out)) for path in out.rglob("*") if path.is_file())


def _checkpoints(run: Path) -> list[Path]:
    """The checkpoints, snapshots and the finished network (distillation's) a reader may open (temporaries are
    hidden)."""
    folders = [run / "checkpoints", run / "snapshots"]
    network = [run / "network.pt"] if (run / "network.pt").is_file() else []
    return sorted([*network, *(path for folder in folders if folder.is_dir() for path in folder.iterdir()
                               if not path.name.startswith("."))])


def _kept_epochs(run: Path) -> set[int]:
    return {int(path.stem.split("-")[1]) for path in (run / "checkpoints").glob("epoch-*.pt")}


def _json(path: Path) -> Any:
    return json.loads(path.read_text())


def _epochs_done(run: Path) -> int:
    """Epochs a run has checkpointed (of its own schedule: FGE counts from its start)."""
    last = run / "checkpoints" / "last.pt"
    return int(checkpoint.load(last)["epoch"]) if last.is_file() else 0


def _check_killed_run(run: Path, reference: Path) -> str:
    """Everything a reader can open in a killed run is whole and is the reference's; returns how far it got."""
    for path in _checkpoints(run):
        state = checkpoint.load(path)  # a torn file raises here
        if path.name != "last.pt":
            _assert_same(state, checkpoint.load(reference / path.relative_to(run)), str(path.relative_to(run)))
    for name in ("config.json", "report.json"):
        if (run / name).is_file():
            _assert_same(_json(run / name), _json(reference / name), name)
    assert _kept_epochs(run) <= _kept_epochs(reference), "a checkpoint the run does not keep"
    last = run / "checkpoints" / "last.pt"
    if not last.is_file():
        return "before the first checkpoint"
    state = checkpoint.load(last)
    epoch = state["epoch_offset"] + state["epoch"]
    final = checkpoint.load(reference / "checkpoints" / "last.pt")
    # Its log and snapshots so far are the reference's first ones, and its weights the reference's where it kept them.
    _assert_same(state["history"], final["history"][:len(state["history"])], "last.pt history")
    _assert_same(state["snapshots"], final["snapshots"][:len(state["snapshots"])], "last.pt snapshots")
    kept = reference / "checkpoints" / f"epoch-{epoch:03d}.pt"
    if kept.is_file():
        _assert_same(state, checkpoint.load(kept), f"last.pt at epoch {epoch}")
    missing = {e for e in _kept_epochs(reference) if e <= epoch} - _kept_epochs(run)
    assert not missing, f"after epoch {epoch} the kept checkpoints of epochs {sorted(missing)} are missing"
    for snapshot in state["snapshots"]:
        assert (run / snapshot["file"]).is_file(), f"{snapshot['file']} is in last.pt but not on disk"
    return "finished" if (run / "report.json").is_file() else f"epoch {epoch}"


def _check_finished_run(run: Path, reference: Path) -> None:
    """The resumed run holds the reference's files, bit for bit, and no temporaries."""
    assert _files(run) == _files(reference)
    for path in _checkpoints(run):
        name = str(path.relative_to(run))
        _assert_same(checkpoint.load(path), checkpoint.load(reference / name), name)
    for name in ("config.json", "report.json"):
        _assert_same(_json(run / name), _json(reference / name), name)
    log, reference_log = ((out / "log.jsonl").read_text().splitlines() for out in (run, reference))
    _assert_same([json.loads(line) for line in log], [json.loads(line) for line in reference_log], "log.jsonl")


def _check_version(version: Path, reference: Path) -> None:
    """`version` is a complete export and the reference's, file for file (its creation time aside)."""
    manifest = load_manifest(version)
    verify_files(manifest, version)
    assert sorted(path.name for path in version.iterdir()) == sorted(path.name for path in reference.iterdir())
    for path in reference.iterdir():
        if path.name != MANIFEST_FILE:
            assert sha256_of(version / path.name) == sha256_of(path), f"{path.name} differs"
    _assert_same(_json(version / MANIFEST_FILE), _json(reference / MANIFEST_FILE), MANIFEST_FILE)


def _check_repository(repository: Path, reference: Path, attempt: Attempt | None = None) -> str:
    """Version 1 is absent or complete and the rest hidden, where no reader looks; returns where `attempt` was."""
    name_dir, version = repository / "synth", repository / "synth" / "1"
    entries = list(name_dir.iterdir()) if name_dir.is_dir() else []
    for entry in entries:
        if entry != version:
            assert KILLED_EXPORT.fullmatch(entry.name), f"{entry} is neither a version nor a killed export's"
    if version.exists():
        _check_version(version, reference)
    if attempt is None:
        return "done"
    def since_attempt(pattern: str) -> list[Path]:
        return [path for path in name_dir.glob(pattern) if path.stat().st_mtime >= attempt.started]

    if list(name_dir.glob(".retired-1-*")):  # renamed, so with the old version's time
        return "between the two renames"
    if staged := since_attempt(".staging-1-*"):
        return f"{len(list(staged[0].glob('*.onnx')))} of {len(list(reference.glob('*.onnx')))} graphs staged"
    if version.exists() and version.stat().st_mtime >= attempt.started:
        return "after publishing"
    return "before staging"


# --------------------------------------------------------------------------- the tests


VARIANTS = [pytest.param(SHORT_KILLS, id="short"), pytest.param(LONG_KILLS, id="long", marks=pytest.mark.long)]


def _summary(command: str, reference: Reference, kills: list[Kill], seconds: float) -> str:
    moments = sorted(kill.moment for kill in kills)
    per_run = Counter(kill.run for kill in kills)
    reached = ", ".join(f"{where}: {count}" for where, count in sorted(Counter(k.reached for k in kills).items()))
    torn = sum(1 for kill in kills if kill.leftovers)
    return (f"{command}: {len(kills)} kills in {len(per_run)} runs (at most {max(per_run.values())} in one) in "
            f"{seconds:.1f} s; uninterrupted run {reference.seconds:.1f} s, first file at "
            f"{reference.first_write:.1f} s; kill points {moments[0]:.2f}-{moments[-1]:.2f} s; {torn} kills left a "
            f"half-written file; reached: {reached}")


@pytest.mark.parametrize("kills", VARIANTS)
def test_train_killed_at_random_resumes_to_the_same_weights(train_reference: Reference, kills: int,
                                                              tmp_path: Path) -> None:
    def args(out: Path, resumed: bool) -> tuple[str | Path, ...]:
        return (*TRAIN, "--out", out, *(["--resume"] if resumed else []))

    started = time.monotonic()
    landed = crash_until_done(train_reference, kills, random.Random(f"{SEED}-train-{kills}"), tmp_path, args,
                              lambda run, _: _check_killed_run(run, train_reference.out),
                              lambda run: _check_finished_run(run, train_reference.out), _epochs_done)
    print(_summary("train", train_reference, landed, time.monotonic() - started))


@pytest.mark.parametrize("kills", VARIANTS)
def test_fge_killed_at_random_resumes_to_the_same_snapshots(train_reference: Reference, fge_reference: Reference,
                                                             kills: int, tmp_path: Path) -> None:
    def args(out: Path, resumed: bool) -> tuple[str | Path, ...]:
        return (*FGE, "--from", train_reference.out, "--out", out, *(["--resume"] if resumed else []))

    started = time.monotonic()
    landed = crash_until_done(fge_reference, kills, random.Random(f"{SEED}-fge-{kills}"), tmp_path, args,
                              lambda run, _: _check_killed_run(run, fge_reference.out),
                              lambda run: _check_finished_run(run, fge_reference.out), _epochs_done)
    print(_summary("fge", fge_reference, landed, time.monotonic() - started))


@pytest.mark.parametrize("kills", VARIANTS)
def test_sse_killed_at_random_resumes_to_the_same_snapshots(sse_reference: Reference, kills: int,
                                                             tmp_path: Path) -> None:
    def args(out: Path, resumed: bool) -> tuple[str | Path, ...]:
        return (*SSE, "--out", out, *(["--resume"] if resumed else []))

    started = time.monotonic()
    landed = crash_until_done(sse_reference, kills, random.Random(f"{SEED}-sse-{kills}"), tmp_path, args,
                              lambda run, _: _check_killed_run(run, sse_reference.out),
                              lambda run: _check_finished_run(run, sse_reference.out), _epochs_done)
    print(_summary("sse", sse_reference, landed, time.monotonic() - started))


@pytest.mark.parametrize("kills", VARIANTS)
def test_distillation_killed_at_random_resumes_to_the_same_student(fge_reference: Reference,
                                                                   distill_reference: Reference, kills: int,
                                                                   tmp_path: Path) -> None:
    def args(out: Path, resumed: bool) -> tuple[str | Path, ...]:
        return (*DISTILL, "--teacher", fge_reference.out, "--out", out, *(["--resume"] if resumed else []))

    started = time.monotonic()
    landed = crash_until_done(distill_reference, kills, random.Random(f"{SEED}-distill-{kills}"), tmp_path, args,
                              lambda run, _: _check_killed_run(run, distill_reference.out),
                              lambda run: _check_finished_run(run, distill_reference.out), _epochs_done)
    print(_summary("distill", distill_reference, landed, time.monotonic() - started))


@pytest.mark.parametrize("kills", VARIANTS)
def test_export_killed_at_random_publishes_whole_versions_only(fge_reference: Reference,
                                                                export_reference: Reference, kills: int,
                                                                tmp_path: Path) -> None:
    reference = export_reference.out / "synth" / "1"

    def args(out: Path, resumed: bool) -> tuple[str | Path, ...]:
        return (*EXPORT, "--from", fge_reference.out, "--out", out)  # a killed export is run again, as it was

    def finished(repository: Path) -> None:
        _check_repository(repository, reference)
        assert (repository / "synth" / "1").is_dir()

    started = time.monotonic()
    landed = crash_until_done(export_reference, kills, random.Random(f"{SEED}-export-{kills}"), tmp_path, args,
                              lambda repository, attempt: _check_repository(repository, reference, attempt),
                              finished)
    print(_summary("export", export_reference, landed, time.monotonic() - started))


TRUNCATIONS: dict[str, Callable[[int], int]] = {
    "empty": lambda size: 0, "1 byte": lambda size: 1, "100 bytes": lambda size: 100, "half": lambda size: size // 2,
    "all but 1 byte": lambda size: size - 1,
}


@pytest.mark.parametrize("keep", TRUNCATIONS.values(), ids=TRUNCATIONS.keys())
def test_a_truncated_checkpoint_is_a_one_line_error_naming_it(train_reference: Reference,
                                                              keep: Callable[[int], int], tmp_path: Path) -> None:
    whole = (train_reference.out / "checkpoints" / "last.pt").read_bytes()
    path = tmp_path / "last.pt"
    path.write_bytes(whole[:keep(len(whole))])
    with pytest.raises(UsageError) as raised:
        checkpoint.load(path)
    message = str(raised.value)
    assert len(message.splitlines()) == 1 and message.startswith(f"{path} is not a readable checkpoint (truncated")


def test_resuming_from_a_truncated_checkpoint_says_so_in_one_line(train_reference: Reference, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(train_reference.out, run)
    torn = run / "checkpoints" / "last.pt"
    torn.write_bytes(torn.read_bytes()[:torn.stat().st_size // 2])
    result = cli(*TRAIN, "--out", run, "--resume", check=False, env=ENVIRONMENT)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"valley-train: error: {torn} is not a readable checkpoint (truncated, or not written by valley-train): "
        "RuntimeError: PytorchStreamReader failed reading zip archive: failed finding central directory"
    ]


def test_exporting_a_truncated_snapshot_is_a_one_line_error(fge_reference: Reference, tmp_path: Path) -> None:
    run = tmp_path / "fge"
    shutil.copytree(fge_reference.out, run)
    torn = run / "snapshots" / "member-01.pt"
    torn.write_bytes(torn.read_bytes()[:torn.stat().st_size // 2])
    config = ExportConfig(runs=[run], name="synth", repository=tmp_path / "repository")
    with pytest.raises(UsageError, match=f"^{re.escape(str(torn))} is not a readable checkpoint") as raised:
        export_ensemble(config)
    assert len(str(raised.value).splitlines()) == 1
    assert not (tmp_path / "repository" / "synth" / "1").exists()
