"""Who may call what: TLS (mutual when a client CA is given) and bearer tokens with roles.

Tokens file (`--tokens-file`): one `TOKEN ROLE[,ROLE...]` per line, `#` starts a comment. Roles:
`infer` (inference, streaming), `feedback` (labels through valley.v1.Feedback), `admin`
(repository load and unload). Any valid token may read metadata, readiness and statistics;
`grpc.health.v1` and reflection stay open, so probes need no token. Callers send
`authorization: Bearer <token>` metadata (tritonclient's `headers=`). An admin token may do
everything. Served predictions are kept per caller (`Caller.principal`), so a label is accepted
only from the token that was served the prediction.

Only SHA-256 digests of the tokens are kept, and a presented token is compared with every one
of them by `hmac.compare_digest`, so neither memory nor timing reveals a token. The file is read
again when it changes (checked at most once a second); a file that no longer parses keeps the
tokens already loaded and says why in the log.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import grpc

from service.errors import PermissionDenied, Unauthenticated

log = logging.getLogger(__name__)

ROLES = ("infer", "feedback", "admin")
# The role each RPC needs; an RPC not named here needs a valid token of any role.
REQUIRED_ROLE = {
    "ModelInfer": "infer",
    "ModelStreamInfer": "infer",
    "Report": "feedback",
    "RepositoryModelLoad": "admin",
    "RepositoryModelUnload": "admin",
    "RepositoryIndex": "admin",
    "Suggest": "admin",
    "Recalibrate": "admin",
}
RECHECK_S = 1.0
MAX_TOKEN_BYTES = 4096


class TokensFileError(ValueError):
    """The tokens file cannot be used; the message names the line."""


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: a short fingerprint of its token (safe to log and to store) and its roles."""

    principal: str
    roles: frozenset[str]


ANONYMOUS = Caller("anonymous", frozenset(ROLES))
# The caller of the RPC being served (set before its handler runs; each RPC is a task of its own).
CALLER: ContextVar[Caller] = ContextVar("caller", default=ANONYMOUS)


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


def parse_tokens(text: str, source: str = "tokens file") -> list[tuple[bytes, Caller]]:
    """(digest, caller) for every line of a tokens file; raises `TokensFileError` naming the bad line."""
    entries: list[tuple[bytes, Caller]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) != 2:
            raise TokensFileError(f"{source} line {number}: expected 'TOKEN ROLE[,ROLE...]'")
        token, roles = fields[0].encode(), frozenset(role for role in fields[1].split(",") if role)
        unknown = sorted(roles - set(ROLES))
        if unknown or not roles:
            raise TokensFileError(f"{source} line {number}: unknown role {', '.join(unknown) or '(none)'}; "
                                  f"roles are {', '.join(ROLES)}")
        if len(token) < 16:
            raise TokensFileError(f"{source} line {number}: a token needs at least 16 characters")
        if len(token) > MAX_TOKEN_BYTES:
            raise TokensFileError(f"{source} line {number}: a token has at most {MAX_TOKEN_BYTES} characters")
        digest = _digest(token)
        entries.append((digest, Caller(f"token-{digest.hex()[:12]}", roles)))
    if not entries:
        raise TokensFileError(f"{source}: no tokens (every caller would be refused)")
    return entries


class Tokens:
    """The tokens file, read again when it changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp = self._file_stamp()
        self._entries = parse_tokens(path.read_text(encoding="utf-8"), str(path))  # at start, errors are fatal
        self._checked = time.monotonic()

    def _file_stamp(self) -> tuple[int, int, int]:
        status = os.stat(self.path)
        return status.st_mtime_ns, status.st_size, status.st_ino

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < RECHECK_S:
            return
        with self._lock:
            self._checked = now
            try:
                stamp = self._file_stamp()
                if stamp == self._stamp:
                    return
                entries = parse_tokens(self.path.read_text(encoding="utf-8"), str(self.path))
            except (OSError, UnicodeDecodeError, TokensFileError) as error:
                log.error("tokens file not reloaded, the tokens read before stay: %s", error)
                return
            self._entries, self._stamp = entries, stamp
            log.info("tokens file reloaded: %d tokens", len(entries))

    def caller(self, token: bytes) -> Caller | None:
        """The caller `token` belongs to, or None; compares with every entry, whether or not one matched."""
        self._refresh()
        digest = _digest(token)
        found: Caller | None = None
        for known, caller in self._entries:
            if hmac.compare_digest(known, digest):
                found = caller
        return found


def bearer_token(metadata: tuple[tuple[str, str | bytes], ...] | None) -> bytes | None:
    """The token of an `authorization: Bearer <token>` metadata entry, if there is one."""
    for key, value in metadata or ():
        if key.lower() == "authorization":
            text = value.decode("latin-1") if isinstance(value, bytes) else value
            scheme, _, token = text.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip().encode("latin-1", errors="replace")[:MAX_TOKEN_BYTES + 1]
    return None


class Authorizer:
    """Decides, per RPC, whether the caller may make it; open to everyone without a tokens file."""

    def __init__(self, tokens: Tokens | None) -> None:
        self.tokens = tokens

    def check(self, method: str, metadata: tuple[tuple[str, str | bytes], ...] | None) -> Caller:
        """The caller of `method`; raises Unauthenticated or PermissionDenied."""
        if self.tokens is None:
            return ANONYMOUS
        token = bearer_token(metadata)
        if token is None:
            raise Unauthenticated("no bearer token: send 'authorization: Bearer <token>' metadata "
                                  "(tritonclient: headers={'authorization': 'Bearer ...'})")
        caller = self.tokens.caller(token)
        if caller is None:
            raise Unauthenticated("the bearer token is not valid for this server")
        role = REQUIRED_ROLE.get(method)
        if role is not None and role not in caller.roles and "admin" not in caller.roles:
            raise PermissionDenied(f"{method} needs a token with the '{role}' role")
        return caller


# Everyone may call everything: the server without a tokens file.
OPEN = Authorizer(None)


def server_credentials(cert: Path, key: Path, client_ca: Path | None) -> grpc.ServerCredentials:
    """TLS for the gRPC port; with `client_ca`, clients must present a certificate it signed (mutual TLS)."""
    return grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())],
                                       root_certificates=client_ca.read_bytes() if client_ca else None,
                                       require_client_auth=client_ca is not None)
