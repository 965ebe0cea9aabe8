"""`valley-serve`: serve every ensemble in a model repository over gRPC and HTTP/REST.

    valley-serve --repository runs/ensembles [--grpc-port 8001] [--http-port 8000] [--metrics-port 8002]
    valley-serve --repository runs/ensembles --grpc-port 0 --http-port 0 --metrics-port 0 --ready-file ready.json

Once the ensembles are loaded, one JSON line on stdout (and in `--ready-file`) gives the ports
bound and the readiness: with port 0 that is how a caller learns them. Every flag can also
come from a `VALLEY_*` environment variable (`VALLEY_GRPC_PORT=8001`); `valley-serve --help`
lists them. Exits 0 after a graceful SIGTERM/SIGINT shutdown, 2 on
bad settings, 1 when the server cannot start.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

from pydantic import ValidationError
from pydantic_settings import CliSettingsSource

from service.feedback import StoreConfigError
from service.observe.logs import configure as configure_logging
from service.server import serve
from service.settings import Settings

log = logging.getLogger("service")


def parse_settings(argv: Sequence[str]) -> Settings:
    """Settings from flags, then `VALLEY_*` variables, then defaults; exits 2 with one line per problem."""
    flags: CliSettingsSource[Settings] = CliSettingsSource(Settings, cli_prog_name="valley-serve", cli_kebab_case=True)
    try:
        return Settings(_cli_settings_source=flags(args=list(argv)))
    except ValidationError as error:
        for problem in error.errors():
            message = problem["msg"].removeprefix("Value error, ")
            if problem["loc"]:
                field = "--" + "-".join(str(part) for part in problem["loc"]).replace("_", "-")
                message = f"{field}: {message}"
            print(f"valley-serve: {message}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: Sequence[str] | None = None) -> None:
    settings = parse_settings(sys.argv[1:] if argv is None else argv)
    configure_logging(settings.log_level, settings.log_format)
    if not settings.repository.is_dir():
        print(f"valley-serve: --repository {settings.repository} is not a folder", file=sys.stderr)
        raise SystemExit(2)
    ready_file = settings.ready_file
    if ready_file is not None and (ready_file.is_dir() or not ready_file.parent.is_dir()):
        print(f"valley-serve: --ready-file {ready_file}: name a file in an existing folder", file=sys.stderr)
        raise SystemExit(2)
    try:
        asyncio.run(serve(settings))
    except StoreConfigError as error:
        print(f"valley-serve: --feedback-store: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as error:
        log.error("cannot start: %s", error)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
