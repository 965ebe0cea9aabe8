"""`valley-recalibrate`: recalibrate an ensemble from the labels a fleet sent back, as a job.

    valley-recalibrate --repository DIR --feedback-store URL --model NAME [--min-labels 100] [--window 1000]

Reads the last `--window` labels of the model's newest version from the shared feedback store
(every replica's), fits the temperature with the code the `Recalibrate` RPC runs
(`service.control.recalibrate`), publishes the next version into the repository, checks that it loads, and
prints one JSON line. Replicas in `poll` mode pick the version up. The whole run holds the
store's lock for the model, which the RPC takes too: of two runs at once (two jobs, or a job and
the RPC) one publishes and the other then finds the newest version without labels of its own.

Exit status: 0 published; 3 not enough labels yet (nothing written; run it again later); 2 a
usage or configuration problem (one line on stderr); 1 the publication failed (nothing left
behind: a version that does not load is withdrawn).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

from artefact.calibration import TEMPERATURE_RANGE
from artefact.manifest import ManifestError, load_manifest
from artefact.repository import published_versions, withdraw
from service.control.recalibrate import applied, lock_name, publish, suggest
from service.core.ensemble import load_ensemble
from service.feedback import StoreConfigError, open_store
from service.feedback.core import Store
from service.feedback.urls import redact

# The manifest's rule for ensemble names: a name is one folder of the repository, never a path.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
NOT_ENOUGH_LABELS = 3
USAGE = 2
FAILED = 1

log = logging.getLogger("valley-recalibrate")


class Refused(Exception):
    """A problem the caller can fix (exit 2)."""


def newest_version(repository: Path, model: str) -> Path:
    """The newest version folder of `model` whose manifest reads."""
    folder = repository / model
    if not folder.is_dir():
        raise Refused(f"the repository {repository} has no model {model!r}")
    for version in reversed(published_versions(folder)):
        try:
            load_manifest(folder / str(version))
        except ManifestError as error:
            log.warning("skipping %s version %d: %s", model, version, error)
            continue
        return folder / str(version)
    raise Refused(f"model {model!r} has no version with a readable manifest in {folder}")


def recalibrate(store: Store, repository: Path, model: str, min_labels: int, window: int,
                temperature: float | None) -> tuple[int, dict[str, object]]:
    """Publish the next version of `model` from the store's labels: (exit status, the JSON line's fields)."""
    with store.lock(lock_name(model)):
        parent_dir = newest_version(repository, model)
        manifest = load_manifest(parent_dir)
        labelled = store.window(model, manifest.version, window)
        count = len(labelled) if labelled is not None else 0
        facts: dict[str, object] = {"model": model, "version": manifest.version, "labels": count,
                                    "min_labels": min_labels}
        if labelled is None or count < min_labels:
            return NOT_ENOUGH_LABELS, {**facts, "published": False,
                                       "reason": f"{count} labels of version {manifest.version} in the store, "
                                                 f"{min_labels} needed"}
        suggestion = suggest(labelled, manifest.temperature)
        assert suggestion is not None, "the window holds labels"
        chosen, after = applied(suggestion, labelled, manifest.temperature, temperature)
        published = publish(parent_dir, chosen, suggestion, after, caller="valley-recalibrate")
        try:
            load_ensemble(published, device="cpu")
        except Exception as error:
            hidden = withdraw(published)
            raise RuntimeError(f"version {published.name} was published but does not load, and was withdrawn to "
                               f"{hidden.name}: {error}") from error
        return 0, {**facts, "published": True, "new_version": int(published.name), "temperature": chosen,
                   "parent_temperature": manifest.temperature, "suggested_temperature": suggestion.suggested,
                   "before": suggestion.current_metrics, "after": after}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="valley-recalibrate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, required=True, help="the model repository (writable)")
    parser.add_argument("--feedback-store", required=True, metavar="URL",
                        help="the fleet's feedback store: sqlite:PATH or postgresql://...")
    parser.add_argument("--model", required=True, help="the ensemble to recalibrate")
    parser.add_argument("--min-labels", type=int, default=100, help="labels needed to fit (default 100)")
    parser.add_argument("--window", type=int, default=1000, help="the newest labels fitted on (default 1000)")
    parser.add_argument("--temperature", type=float, help="apply this temperature instead of the fitted one")
    parser.add_argument("--log-level", default="WARNING", type=str.upper,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    if not MODEL_NAME.fullmatch(args.model):
        parser.error(f"--model {args.model[:80]!r} is not an ensemble name (letters, digits, '_', '.', '-')")
    if args.min_labels < 1 or args.window < args.min_labels:
        parser.error("--min-labels must be at least 1 and --window at least --min-labels")
    if args.temperature is not None and not TEMPERATURE_RANGE[0] <= args.temperature <= TEMPERATURE_RANGE[1]:
        parser.error(f"--temperature must be in [{TEMPERATURE_RANGE[0]}, {TEMPERATURE_RANGE[1]}]")
    if not args.repository.is_dir():
        _fail(USAGE, f"the repository {args.repository} is not a folder")
    try:
        store = open_store(args.feedback_store, ttl_seconds=1e12, max_predictions=1 << 62, max_bytes=1 << 62,
                           replica="valley-recalibrate")
    except StoreConfigError as error:
        _fail(USAGE, str(error))
    if not store.shared:
        _fail(USAGE, f"--feedback-store {args.feedback_store!r} is this process's memory: give the store the "
                     "replicas share (sqlite:PATH or postgresql://...)")
    try:
        status, facts = recalibrate(store, args.repository, args.model, args.min_labels, args.window,
                                    args.temperature)
    except Refused as error:
        _fail(USAGE, str(error))
    except Exception as error:
        log.debug("recalibration failed", exc_info=True)
        _fail(FAILED, redact(" ".join(str(error).split()))[:500])
    finally:
        store.close(timeout=5.0)
    print(json.dumps(facts), flush=True)
    sys.exit(status)


def _fail(status: int, message: str) -> None:
    print(f"valley-recalibrate: error: {message}", file=sys.stderr)
    sys.exit(status)


if __name__ == "__main__":
    main()
