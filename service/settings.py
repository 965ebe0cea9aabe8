"""Server settings: command-line flags, or `VALLEY_*` environment variables (how Kubernetes sets them).

Every field has a docstring-like description; `valley-serve --help` prints them. Flags win
over environment variables, which win over the defaults here.
"""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, CliImplicitFlag, SettingsConfigDict

from artefact.config import Device, Execution, Precision
from artefact.policy import VersionPolicy
from service.core.cpus import threads_per_instance
from service.core.members import check_default
from service.transport.security import parse_tokens

MIB = 1 << 20


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
    """What `valley-serve` needs to run; validated at start so a typo fails before anything loads."""

    model_config = SettingsConfigDict(env_prefix="VALLEY_", extra="forbid")

    repository: Path = Field(description="folder holding <ensemble>/<version>/manifest.json")
    host: str = Field("127.0.0.1", description="address the gRPC, HTTP and metrics servers bind to (another than "
                      "loopback needs --tokens-file, or --insecure)")
    grpc_port: int = Field(8001, ge=0, le=65535, description="gRPC port (0: pick a free one; the ready line and "
                           "--ready-file say which)")
    http: bool = Field(True, description="also serve the protocol over HTTP/REST (Triton's and KServe's v2 "
                       "routes, JSON and binary tensors) on --http-port")
    http_port: int = Field(8000, ge=0, le=65535, description="HTTP/REST port (0: pick a free one; the ready line "
                           "and --ready-file say which)")
    health_port: int | None = Field(None, ge=0, le=65535, description="also answer grpc.health.v1 (and nothing "
                                    "else) in plaintext on this port: for probes that cannot do TLS or tokens, "
                                    "the kubelet's (0: pick a free one)")
    metrics_port: int = Field(8002, ge=0, le=65535, description="Prometheus /metrics port (0: pick a free one)")
    ready_file: Path | None = Field(None, description="once the ensembles are loaded, write the ports bound and "
                                    "the readiness here as JSON (the line printed on stdout); removed on exit")
    model_control_mode: Literal["none", "poll", "explicit"] = Field(
        "explicit", description="none: load everything at start, refuse load/unload requests; explicit: load "
        "--load-models at start, then what load/unload requests ask; poll: explicit, and look at the repository "
        "every --repository-poll-s to load new or changed versions and unload removed ensembles")
    load_models: str = Field("*", description="ensembles loaded at start in explicit mode, comma-separated (*: all)")
    repository_poll_s: float = Field(15.0, gt=0, description="poll mode: seconds between looks at the repository")
    version_policy: str = Field("latest:1", description="versions served per ensemble: latest:N (the N newest "
                                "that verify), all, or specific:V[,V...]; <ensemble>/config.json or a load "
                                "request's config parameter overrides it per ensemble")
    device: Device = Field("auto", description="auto: CUDA when onnxruntime's CUDA provider really loads, else CPU")
    execution: Execution = Field(
        "fused", description="fused: one graph runs the batches every member answers (fastest), member sessions "
        "the others; members: only the member sessions (half the memory), timed one by one")
    precision: Precision = Field("fp32", description="graphs served: fp32, or a variant the manifest holds (int8; "
                                 "fp16 on the CUDA provider only); a version without it is refused")
    members: str = Field("cascade", description="members answering a request that does not say (its 'members' "
                         "parameter): cascade (the anytime ensemble fitted at export: confident images leave "
                         "after the first stage; the full ensemble where none was fitted), full, or a number N "
                         "(the first N)")
    degrade_queue_ms: float = Field(200.0, ge=0, description="a batch whose oldest request waited longer runs the "
                                    "default plan's first stage only (the answer says 'degraded'); requests "
                                    "that name their members are never cut (0: never degrade)")
    instances: int = Field(2, ge=1, description="copies of each ensemble, each with its own sessions and compute "
                           "thread: while one computes, the next batch is collected and runs on another")
    session_threads: int = Field(0, ge=0, description="onnxruntime intra-op threads per instance (0: the usable "
                                 "cores, affinity capped by the container's CPU quota, divided among the instances)")
    max_batch_size: int = Field(64, ge=1, description="most images merged into one model run; larger requests are "
                                "refused")
    max_queue_delay_ms: float = Field(2.0, ge=0, description="longest a request waits for others to join its batch")
    max_queue_size: int = Field(1024, ge=1, description="requests waiting per model; beyond it UNAVAILABLE at once")
    max_queue_wait_ms: float = Field(1000.0, ge=0, description="longest a request may wait for its model run; "
                                     "one that would wait longer is refused UNAVAILABLE at once (0: no bound "
                                     "but the request's deadline)")
    max_concurrent_rpcs: int = Field(1024, ge=0, description="RPCs served at once (a stream counts as one; health "
                                     "is exempt); beyond it UNAVAILABLE at once (0: no limit)")
    max_message_bytes: int = Field(64 * MIB, ge=1024, description="largest gRPC message received or sent, and "
                                   "largest HTTP request body (before and after decompression)")
    metrics: bool = Field(True, description="request, latency and uncertainty metrics on /metrics (off: only "
                          "process metrics, and runs compute only the outputs clients ask for)")
    feedback: bool | None = Field(None, description="keep served predictions of requests with an id and take "
                                  "their labels through valley.v1.Feedback (default: on when --metrics is on, "
                                  "whose calibration metrics the labels feed)")
    feedback_store: str = Field("auto", description="where served predictions and their labels are kept: "
                                "auto (sqlite: in --state-dir, or memory: where it cannot be written), memory:, "
                                "sqlite:PATH, or postgresql://user@host/db, which every replica of a fleet shares "
                                "(libpq's PG* variables and password file apply; the password is never logged)")
    state_dir: Path | None = Field(None, description="the folder of the embedded feedback store (--feedback-store "
                                   "auto); default $XDG_STATE_HOME/valley or ~/.local/state/valley")
    replica: str = Field(default_factory=socket.gethostname, description="this server's name in the feedback "
                         "store (labels record the replica that received them); default the host name, a pod's "
                         "name on Kubernetes")
    feedback_flush_ms: float = Field(200.0, gt=0, le=60_000, description="a database store writes the served "
                                     "predictions queued within this many ms in one batch (a label reported "
                                     "sooner after its answer may find nothing yet)")
    feedback_queue: int = Field(10_000, ge=1, description="served requests waiting for a database store; beyond it "
                                "they are dropped and counted (valley_feedback_dropped_total)")
    feedback_queue_bytes: int = Field(64 * MIB, ge=MIB, description="memory those waiting requests may take")
    feedback_max_predictions: int = Field(1_000_000, ge=1, description="served predictions (images) kept for "
                                          "feedback labels; the oldest go first")
    feedback_max_bytes: int = Field(256 * MIB, ge=MIB, description="memory the kept predictions may take with "
                                    "--feedback-store memory: (probabilities, ids); the oldest go first")
    feedback_ttl_s: float = Field(7 * 86_400.0, gt=0, description="how long a served prediction can still be "
                                  "labelled, and a label stays in the store (default 7 days)")
    calibration_window: int = Field(1000, ge=1, description="labelled predictions in the live ECE/accuracy/NLL/"
                                    "Brier gauges")
    recalibration_min_labels: int = Field(100, ge=1, description="labels a model version's calibration window "
                                          "must hold before a temperature is suggested from it (metrics and the "
                                          "Calibration RPCs)")
    drift_window: int = Field(0, ge=0, le=1_000_000, description="answers in each model's sliding window for the "
                              "drift score (valley_drift_score); 0: the window the manifest's baseline was fitted "
                              "for (1000 by default), whose clean level is exact (another size scales it)")
    shutdown_grace_s: float = Field(30.0, ge=0, description="on SIGTERM, how long in-flight requests may take")
    tls_cert: Path | None = Field(None, description="PEM certificate (chain) of the gRPC port: TLS; with --tls-key")
    tls_key: Path | None = Field(None, description="PEM private key of --tls-cert")
    tls_client_ca: Path | None = Field(None, description="PEM CA bundle: clients must present a certificate it "
                                       "signed (mutual TLS); needs --tls-cert")
    tokens_file: Path | None = Field(None, description="bearer tokens with roles, one 'TOKEN ROLE[,ROLE...]' per "
                                     "line (roles: infer, feedback, admin); read again when it changes")
    insecure: CliImplicitFlag[bool] = Field(False, description="allow binding another address than loopback "
                                            "without --tokens-file: anyone who reaches the port may then unload "
                                            "every model")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="server log level")
    log_format: Literal["text", "json"] = Field("text", description="text lines, or one JSON object per line "
                                                "(time, level, logger, message) for log collectors")

    @field_validator("version_policy")
    @classmethod
    def _policy(cls, value: str) -> str:
        VersionPolicy.parse(value)  # a PolicyError is a ValueError: pydantic reports it as the flag's
        return value

    @field_validator("members")
    @classmethod
    def _members(cls, value: str) -> str:
        return check_default(value)

    @property
    def degrade_after(self) -> float | None:
        """`degrade_queue_ms` in seconds; None: never degrade."""
        return self.degrade_queue_ms / 1000.0 if self.degrade_queue_ms else None

    @property
    def startup_models(self) -> list[str]:
        """The names loaded at start: every one unless explicit mode names some."""
        names = [name.strip() for name in self.load_models.split(",") if name.strip()]
        return ["*"] if self.model_control_mode != "explicit" or "*" in names else names

    @model_validator(mode="after")
    def _secure_enough(self) -> Settings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        for name in ("tls_cert", "tls_key", "tls_client_ca", "tokens_file"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"--{name.replace('_', '-')} {path}: no such file")
            # grpc says only that the port could not be opened when a certificate or key does not load.
            if path is not None and name.startswith("tls") and b"-----BEGIN " not in path.read_bytes():
                raise ValueError(f"--{name.replace('_', '-')} {path}: not a PEM file (no '-----BEGIN' line)")
        if self.tokens_file is not None:
            try:
                parse_tokens(self.tokens_file.read_text(encoding="utf-8"), str(self.tokens_file))
            except (OSError, UnicodeDecodeError) as error:
                raise ValueError(f"--tokens-file {self.tokens_file}: {error}") from None
        if self.tokens_file is None and not self.insecure and not _loopback(self.host):
            raise ValueError(f"--host {self.host} without --tokens-file would let anyone who reaches the port "
                             "call everything, model unloading included: give --tokens-file, bind 127.0.0.1, "
                             "or pass --insecure to accept that")
        return self

    @property
    def feedback_on(self) -> bool:
        """`feedback`, or by default whether metrics are on."""
        return self.metrics if self.feedback is None else self.feedback

    @property
    def threads_per_instance(self) -> int:
        """`session_threads`, or the cores this process may use shared among the instances."""
        return threads_per_instance(self.session_threads, self.instances)

    @property
    def max_queue_wait(self) -> float | None:
        """`max_queue_wait_ms` in seconds; None for no bound."""
        return self.max_queue_wait_ms / 1000.0 if self.max_queue_wait_ms else None

    @property
    def max_queue_delay(self) -> float:
        """`max_queue_delay_ms` in seconds."""
        return self.max_queue_delay_ms / 1000.0
