"""The feedback loop on a fleet: three `valley-serve` replicas on loopback share one PostgreSQL and one polled
repository, as the Kubernetes deployment runs them.

Real components throughout: Debian's PostgreSQL (a throwaway cluster, `tests/postgres.py`), Prometheus scraping
every replica, tritonclient for inference, valley.v1.Feedback for labels, `valley-recalibrate` as a job would run
it, and real Fashion-MNIST images through a real (small) FGE ensemble.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton

from artefact.metrics import ece
from service.launch import ServerProcess
from tests.conftest import REPO
from tests.e2e.conftest import (
    health_status,
    prometheus,
    prometheus_query,
    report,
    scraped,
    start_server_process,
    stop_server_process,
    triton_inputs,
)
from tests.postgres import PostgresServer
from training.data import FASHION_MNIST_DIR, read_idx

MODEL = "fashion"
FLUSH_MS = 100
POLL_S = 1.0
IMAGES = read_idx(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz")[:600, None]
LABELS = read_idx(FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz")[:600].astype(np.int64)


def _start(repository: Path, url: str, name: str, *flags: str) -> ServerProcess:
    return start_server_process(repository, "--feedback-store", url, "--replica", name, "--model-control-mode", "poll",
                                "--repository-poll-s", str(POLL_S), "--feedback-flush-ms", str(FLUSH_MS), *flags)


@contextmanager
def fleet(repository: Path, url: str, count: int = 3, *flags: str) -> Iterator[list[ServerProcess]]:
    replicas: list[ServerProcess] = []
    try:
        for index in range(count):
            replicas.append(_start(repository, url, f"replica-{index}", *flags))
        yield replicas
    finally:
        for replica in replicas:
            if replica.process.poll() is None:
                stop_server_process(replica)


@pytest.fixture
def repository(fashion_repository: Path, tmp_path: Path) -> Path:
    """A writable copy of the real Fashion-MNIST repository (recalibration publishes into it)."""
    copy = tmp_path / "repository"
    shutil.copytree(fashion_repository, copy)
    return copy


def _serve(replica: ServerProcess, request_id: str, start: int, count: int = 4) -> np.ndarray:
    """Infer images [start, start + count) with a request id; the probabilities served."""
    return _serve_with_sets(replica, request_id, start, count, sets=False)[0]


def _serve_with_sets(replica: ServerProcess, request_id: str, start: int, count: int, sets: bool = True
                     ) -> tuple[np.ndarray, np.ndarray | None]:
    """The same, asking for the prediction sets too (at the model's default coverage)."""
    client = triton.InferenceServerClient(replica.url)
    names = ["probabilities", *(["prediction_set"] if sets else [])]
    answer = client.infer(MODEL, triton_inputs(IMAGES[start:start + count]), request_id=request_id,
                          outputs=[triton.InferRequestedOutput(name) for name in names])
    probabilities: np.ndarray = answer.as_numpy("probabilities")
    return probabilities, answer.as_numpy("prediction_set")


def _labels(request_id: str, start: int, count: int = 4) -> list[tuple[str, int, int]]:
    return [(request_id, position, int(LABELS[start + position])) for position in range(count)]


def _report(replica: ServerProcess, labels: list[tuple[str, int, int]]) -> int:
    return report(replica.url, labels, model=MODEL)


def _sum(metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return sum(value for (metric, found), value in metrics.items()
               if metric == name and all((key, wanted) in found for key, wanted in labels.items()))


def _eventually(check: Callable[[], bool], seconds: float, what: str) -> None:
    ends = time.monotonic() + seconds
    while time.monotonic() < ends:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} within {seconds} s")


def _written(replica: ServerProcess, requests: int) -> bool:
    return _sum(scraped(replica), "valley_feedback_written_total") >= requests


def _serves_version(replica: ServerProcess, version: str) -> bool:
    return version in triton.InferenceServerClient(replica.url).get_model_metadata(MODEL).versions


class Load:
    """Closed-loop inference with request ids against replicas until stopped; every failure is kept."""

    def __init__(self, replicas: list[ServerProcess], threads: int = 3) -> None:
        self.replicas, self.answers = replicas, 0
        self.failures: list[str] = []
        self.versions: set[str] = set()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(index,), daemon=True) for index in range(threads)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _run(self, index: int) -> None:
        clients = [triton.InferenceServerClient(replica.url) for replica in self.replicas]
        count = 0
        while not self._stop.is_set():
            client = clients[count % len(clients)]
            start = (count * 2) % (len(IMAGES) - 2)
            try:
                answer = client.infer(MODEL, triton_inputs(IMAGES[start:start + 2]), request_id=f"load-{index}-{count}",
                                      client_timeout=30)
                with self._lock:
                    self.answers += 1
                    self.versions.add(answer.get_response().model_version)
            except Exception as error:
                with self._lock:
                    self.failures.append(f"{type(error).__name__}: {error}")
            count += 1


def test_labels_join_at_any_replica_and_two_replicas_accept_one_label_once(repository: Path,
                                                                           postgres: PostgresServer) -> None:
    with fleet(repository, postgres.database()) as (serving, second, third):
        for index in range(10):
            _serve(serving, f"r{index}", 4 * index)
        _eventually(lambda: _written(serving, 10), 10, "the serving replica wrote its 10 requests")
        assert _report(second, [label for index in range(5) for label in _labels(f"r{index}", 4 * index)]) == 20
        assert _report(third, _labels("r5", 20)[:2]) == 2
        # The same label at two replicas at the same moment, for five predictions: one acceptance each.
        outcomes: list[str] = []
        lock = threading.Lock()

        def race(replica: ServerProcess, label: tuple[str, int, int], barrier: threading.Barrier) -> None:
            barrier.wait()
            try:
                _report(replica, [label])
                outcome = "accepted"
            except grpc.RpcError as error:
                outcome = error.code().name
            with lock:
                outcomes.append(outcome)

        for index in range(6, 10):
            barrier = threading.Barrier(2)
            label = _labels(f"r{index}", 4 * index)[3]
            threads = [threading.Thread(target=race, args=(replica, label, barrier)) for replica in (second, third)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
        assert sorted(outcomes) == ["ALREADY_EXISTS"] * 4 + ["accepted"] * 4
        # Each label is counted by the replica that received it, once in the fleet.
        counted = [_sum(scraped(replica), "valley_feedback_labels_total", model=MODEL)
                   for replica in (serving, second, third)]
        assert counted[0] == 0 and sum(counted) == 20 + 2 + 4 and counted[1] >= 20


def test_a_replica_killed_after_serving_loses_no_written_prediction(repository: Path,
                                                                    postgres: PostgresServer) -> None:
    """The loss bound: a SIGKILL loses what was still queued, the predictions of the last flush interval. Those
    served longer ago (the written counter says so) join at another replica; those served just before the kill
    by a replica whose writer had not flushed yet are the ones lost."""
    url = postgres.database()
    with fleet(repository, url, count=1) as (survivor,):
        victim = _start(repository, url, "victim")
        slow = _start(repository, url, "slow", "--feedback-flush-ms", "60000")  # it never flushes before the kill
        try:
            for index in range(8):
                _serve(victim, f"k{index}", 4 * index)
            _eventually(lambda: _written(victim, 8), 10, "the victim wrote what it served")
            _serve(slow, "queued", 0)
            assert _sum(scraped(slow), "valley_feedback_queue_predictions") == 1
            for replica in (victim, slow):
                replica.process.send_signal(signal.SIGKILL)
                replica.process.wait(10)
            assert _report(survivor, [label for index in range(8) for label in _labels(f"k{index}", 4 * index)]) \
                == 32
            with pytest.raises(grpc.RpcError) as lost:
                _report(survivor, _labels("queued", 0)[:1])
            assert lost.value.code() == grpc.StatusCode.NOT_FOUND
            # SIGTERM instead: the queue is written before the process exits, whatever the flush interval.
            graceful = _start(repository, url, "graceful", "--feedback-flush-ms", "60000")
            _serve(graceful, "drained", 0)
            stop_server_process(graceful)
            assert _report(survivor, _labels("drained", 0)) == 4
        finally:
            for replica in (victim, slow):
                if replica.process.poll() is None:
                    replica.process.kill()


def test_the_database_down_under_load_fails_no_inference_and_labels_join_after(repository: Path,
                                                                                postgres: PostgresServer) -> None:
    with fleet(repository, postgres.database(), 2, "--feedback-queue", "20") as (serving, labelling):
        with Load([serving, labelling]) as load:
            time.sleep(1.0)
            postgres.stop()
            try:
                down_since = time.monotonic()
                _eventually(lambda: _sum(scraped(serving), "valley_feedback_dropped_total", reason="queue_full") > 0,
                            20, "the serving replica dropped what no longer fit its queue")
                _eventually(lambda: _sum(scraped(serving), "valley_feedback_store_up") == 0, 15,
                            "the serving replica reported the store down")
                assert health_status(serving.grpc_port) == 1, "readiness does not depend on the database"
                with pytest.raises(grpc.RpcError) as refused:
                    _report(labelling, [("load-0-0", 0, 1)])
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "cannot be reached" in (refused.value.details() or "")
                time.sleep(max(0.0, 3.0 - (time.monotonic() - down_since)))
            finally:
                postgres.start()
            down_for, restarted = time.monotonic() - down_since, time.monotonic()
            _eventually(lambda: _sum(scraped(serving), "valley_feedback_store_up") == 1, 30,
                        "the writer reconnected")
            back_after = time.monotonic() - restarted
            time.sleep(1.0)
        # What waited in the queue is written; then a new prediction has room in it, and its labels join.
        _eventually(lambda: _sum(scraped(serving), "valley_feedback_queue_predictions") == 0, 10,
                    "the serving replica's queue drained")
        assert load.answers > 50 and not load.failures, load.failures[:5]
        dropped = _sum(scraped(serving), "valley_feedback_dropped_total")
        print(f"\nPostgreSQL down {down_for:.1f} s under load: {load.answers} requests answered, "
              f"{len(load.failures)} failed, {dropped:.0f} predictions dropped (queue_full), the writer back "
              f"{back_after:.1f} s after the restart")
        _serve(serving, "after", 0)
        _eventually(lambda: _report_or_zero(labelling, _labels("after", 0)) == 4, 10,
                    "labels of a prediction served after the restart joined")


def test_a_replica_starts_and_serves_while_the_database_is_down(repository: Path,
                                                                 postgres: PostgresServer) -> None:
    """A database that is down at start is not a configuration error: the replica starts, is ready and serves;
    what it serves waits in its queue, and once the database is up (its schema created then) the labels join."""
    url = postgres.database()
    postgres.stop()
    replica: ServerProcess | None = None
    try:
        replica = _start(repository, url, "early")
        assert health_status(replica.grpc_port) == 1
        _serve(replica, "early", 0)
        assert _sum(scraped(replica), "valley_feedback_store_up") == 0
        with pytest.raises(grpc.RpcError) as refused:
            _report(replica, _labels("early", 0))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        postgres.start()
        _eventually(partial(_joined, replica, _labels("early", 0)), 20,
                    "the queued prediction was written once the database came up, and its labels joined")
    finally:
        if not postgres.running():
            postgres.start()
        if replica is not None:
            stop_server_process(replica)


def _joined(replica: ServerProcess, labels: list[tuple[str, int, int]]) -> bool:
    return _report_or_zero(replica, labels) == len(labels)


def _report_or_zero(replica: ServerProcess, labels: list[tuple[str, int, int]]) -> int:
    """The number of labels accepted, or 0 while the prediction is not yet in the store."""
    try:
        return _report(replica, labels)
    except grpc.RpcError as error:
        if error.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
            raise
        return 0


def test_prometheus_sums_the_replicas_into_the_fleets_calibration(repository: Path, postgres: PostgresServer,
                                                                  tmp_path: Path) -> None:
    """Labels reported at three replicas for predictions served by them all: the fleet ECE, accuracy and prediction
    sets' live coverage of the recording rules equal what the same labels give offline, and each replica's rule
    covers its own labels."""
    served: list[np.ndarray] = []
    truth: list[np.ndarray] = []
    held: list[np.ndarray] = []
    with fleet(repository, postgres.database()) as replicas, \
            prometheus(tmp_path, [replica.metrics_port for replica in replicas]) as prometheus_url:
        for index in range(60):
            start = 8 * index
            probabilities, sets = _serve_with_sets(replicas[index % 3], f"p{index}", start, 8)
            assert sets is not None
            served.append(probabilities)
            truth.append(LABELS[start:start + 8])
            held.append(sets[np.arange(8), truth[-1]])
        for replica in replicas:
            _eventually(partial(_written, replica, 20), 10, "every replica wrote what it served")
        for index in range(60):  # labels come back through another replica than the one that served
            assert _report(replicas[(index + 1) % 3], _labels(f"p{index}", 8 * index, 8)) == 8
        probabilities, labels = np.concatenate(served), np.concatenate(truth)
        expected_ece, expected_accuracy = ece(probabilities, labels), float(np.mean(probabilities.argmax(1) == labels))

        def fleet_value(rule: str) -> float | None:
            result = prometheus_query(prometheus_url, f'{rule}{{model="{MODEL}"}}')
            return float(result[0]["value"][1]) if len(result) == 1 else None

        _eventually(lambda: fleet_value("valley:feedback_labels:count") == 480, 30,
                    "Prometheus counted the fleet's 480 labels")
        assert fleet_value("valley:feedback_ece:ratio") == pytest.approx(expected_ece, abs=1e-9)
        assert fleet_value("valley:feedback_accuracy:ratio") == pytest.approx(expected_accuracy, abs=1e-12)
        def per_replica() -> list[float]:
            found = prometheus_query(prometheus_url, f'valley:feedback_labels_by_instance:count{{model="{MODEL}"}}')
            return sorted(float(entry["value"][1]) for entry in found)

        # Recorded later in the same evaluation as the fleet's count: it may lag that one by a cycle.
        _eventually(lambda: per_replica() == [160.0] * 3, 30, "each replica's rule counts its own 160 labels")
        _eventually(lambda: len(prometheus_query(
            prometheus_url, f'valley:feedback_ece_by_instance:ratio{{model="{MODEL}"}}')) == 3, 30,
            "each replica's ECE is recorded")
        # Sets served by one replica, labelled at another: the fleet's live coverage is the share of the sets served
        # that held the true class (the repository's ensemble was exported with the default coverage, 0.9).
        expected_coverage = float(np.concatenate(held).mean())
        _eventually(lambda: fleet_value("valley:feedback_set_coverage:ratio") == pytest.approx(expected_coverage,
                                                                                               abs=1e-9),
                    30, "Prometheus's live coverage is the coverage of the sets served")
        coverage = prometheus_query(prometheus_url, f'valley:feedback_set_coverage:ratio{{model="{MODEL}"}}')
        assert [entry["metric"]["coverage"] for entry in coverage] == ["0.9"]
        assert 0.8 < expected_coverage <= 1.0
        target = prometheus_query(prometheus_url, f'sum(valley_feedback_set_target_total{{model="{MODEL}"}}) / '
                                                  f'sum(valley_feedback_sets_total{{model="{MODEL}"}})')
        assert float(target[0]["value"][1]) == pytest.approx(0.9, abs=1e-9)


def _recalibrate(repository: Path, url: str, *flags: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "service.control.recalibrate_job", "--repository", str(repository),
                             "--feedback-store", url, "--model", MODEL, *flags], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_valley_recalibrate_publishes_once_and_every_replica_serves_it(repository: Path,
                                                                       postgres: PostgresServer) -> None:
    url = postgres.database()
    with fleet(repository, url) as replicas:
        for index in range(30):
            _serve(replicas[index % 3], f"c{index}", 4 * index)
        for replica in replicas:
            _eventually(partial(_written, replica, 10), 10, "every replica wrote what it served")
        for index in range(30):
            _report(replicas[(index + 2) % 3], _labels(f"c{index}", 4 * index))
        early = _recalibrate(repository, url, "--min-labels", "500")
        early_out, early_err = early.communicate(timeout=120)
        assert early.returncode == 3 and not early_err, early_err
        assert json.loads(early_out) == {"model": MODEL, "version": 1, "labels": 120, "min_labels": 500,
                                         "published": False, "reason": "120 labels of version 1 in the store, "
                                                                       "500 needed"}
        with Load(replicas) as load:
            jobs = [_recalibrate(repository, url, "--min-labels", "100") for _ in range(2)]
            results = [(job.wait(180), *job.communicate()) for job in jobs]
            statuses = sorted(status for status, _, _ in results)
            assert statuses == [0, 3], results
            published = json.loads(next(out for status, out, _ in results if status == 0))
            assert published["published"] is True and published["version"] == 1 and published["new_version"] == 2
            assert published["labels"] == 120 and published["temperature"] == published["suggested_temperature"]
            assert sorted(entry.name for entry in (repository / MODEL).iterdir()) == ["1", "2"], "published once"
            started = time.monotonic()
            for replica in replicas:
                _eventually(partial(_serves_version, replica, "2"), 3 * POLL_S + 5,
                            "every replica serves version 2 within the poll interval")
            switched = time.monotonic() - started
            assert switched < 3 * POLL_S + 5
            time.sleep(0.5)
        assert not load.failures, load.failures[:5]
        assert "2" in load.versions and load.answers > 20
        print(f"\nvalley-recalibrate under load: two concurrent runs, exit {statuses}; every replica served "
              f"version 2 within {switched:.1f} s of publication (poll {POLL_S:g} s); {load.answers} requests "
              f"answered, {len(load.failures)} failed")
        manifest = json.loads((repository / MODEL / "2" / "manifest.json").read_text())
        assert manifest["recalibration"]["labels"] == 120 and manifest["recalibration"]["created_by"] == \
            "valley-recalibrate"


def test_the_embedded_default_keeps_labels_across_a_restart(repository: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    # A flush interval longer than the test: what the restart finds was written at SIGTERM.
    server = start_server_process(repository, "--feedback-flush-ms", "60000", env={"XDG_STATE_HOME": str(state)})
    _serve(server, "kept", 0)
    log = stop_server_process(server)  # SIGTERM: what is queued is written first
    assert (state / "valley" / "feedback.sqlite3").is_file() and "feedback store: sqlite" in log
    again = start_server_process(repository, env={"XDG_STATE_HOME": str(state)})
    try:
        assert _report(again, _labels("kept", 0)) == 4
        with pytest.raises(grpc.RpcError) as twice:
            _report(again, _labels("kept", 0)[:1])
        assert twice.value.code() == grpc.StatusCode.ALREADY_EXISTS
    finally:
        stop_server_process(again)


@pytest.mark.parametrize(("store", "problem"), [
    ("bogus://x", "unknown feedback store 'bogus://x'"),
    ("memory:somewhere", "the memory store takes no location"),
    ("sqlite:/no/such/folder/feedback.db", "folder /no/such/folder does not exist"),
    ("postgresql://valley@127.0.0.1:notaport/valley", "cannot be read"),
    ("WRONG_PASSWORD", "refused the connection: wrong user or password"),
    ("NO_DATABASE", "refused the connection"),
])
def test_a_store_that_cannot_work_is_one_line_and_exit_2(store: str, problem: str, repository: Path,
                                                          postgres: PostgresServer, tmp_path: Path) -> None:
    secret = "Sh0uldNeverBeSeen"
    if store == "WRONG_PASSWORD":
        store = postgres.url_with(secret)
    elif store == "NO_DATABASE":
        store = postgres.url.rsplit("/", 1)[0] + "/no_such_database"
        problem = "refused the connection: "
    for command in ([sys.executable, "-m", "service.cli", "--repository", str(repository), "--grpc-port", "0",
                     "--http-port", "0", "--metrics-port", "0", "--feedback-store", store],
                    [sys.executable, "-m", "service.control.recalibrate_job", "--repository", str(repository),
                     "--feedback-store", store, "--model", MODEL]):
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60,
                                env={"XDG_STATE_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and problem in lines[0], result.stderr
        assert "Traceback" not in result.stderr and secret not in result.stderr + result.stdout
        assert postgres.password not in result.stderr + result.stdout
