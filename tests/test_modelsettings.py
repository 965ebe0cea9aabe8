"""An ensemble's config.json: Triton's names where Triton has them, every wrong key named, the server's flags
where the file is silent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from artefact.config import MAX_CONFIG_BYTES, ConfigError, parse, read_config
from artefact.policy import VersionPolicy
from service.core.modelsettings import ModelOptions
from service.errors import InvalidInput
from service.settings import Settings


def _settings(tmp_path: Path, **flags: object) -> Settings:
    return Settings(repository=tmp_path, **flags)  # type: ignore[arg-type]


def test_triton_names_and_protobuf_json_integers_are_read(tmp_path: Path) -> None:
    config = parse(json.dumps({
        "name": "m", "platform": "valley_ensemble", "backend": "onnxruntime", "max_batch_size": 8,
        "version_policy": {"latest": {"num_versions": 2}},
        "dynamic_batching": {"preferred_batch_size": [8, 4, 4], "max_queue_delay_microseconds": "300",
                             "default_queue_policy": {"timeout_action": "REJECT", "max_queue_size": "20",
                                                      "default_timeout_microseconds": 0,
                                                      "allow_timeout_override": True}},
        "instance_group": [{"name": "m_0", "kind": "KIND_CPU", "count": 3}],
        "execution": "members", "precision": "int8", "members": "2", "target_accuracy": 0.97}), "m/config.json", "m")
    options = ModelOptions.of(_settings(tmp_path)).over(config, _settings(tmp_path))
    assert config.policy == VersionPolicy("latest", 2)
    assert options.max_batch_size == 8 and options.preferred_batch_sizes == (4, 8)
    assert options.max_queue_delay == pytest.approx(300e-6) and options.max_queue_size == 20
    assert options.max_queue_wait is None, "0 µs: no bound but the request's deadline, as --max-queue-wait-ms 0"
    assert options.instances == 3 and options.device == "cpu"
    assert (options.execution, options.precision, options.members, options.target_accuracy) == \
        ("members", "int8", "2", 0.97)


def test_what_the_file_does_not_set_is_the_servers_flags(tmp_path: Path) -> None:
    settings = _settings(tmp_path, max_batch_size=32, instances=1, session_threads=3, members="full",
                         max_queue_wait_ms=500.0, calibration_window=77)
    options = ModelOptions.of(settings).over(parse('{"execution": "members"}', "c", "m"), settings)
    assert (options.max_batch_size, options.instances, options.session_threads, options.members) == (32, 1, 3, "full")
    assert options.max_queue_wait == 0.5 and options.calibration_window == 77 and options.execution == "members"
    assert ModelOptions.of(settings).over(None, settings) == ModelOptions.of(settings)
    with pytest.raises(InvalidInput, match="preferred_batch_size 64 is over the max_batch_size of 32"):
        ModelOptions.of(settings).over(parse('{"dynamic_batching": {"preferred_batch_size": [64]}}', "c", "m"),
                                       settings)


@pytest.mark.parametrize(("text", "named"), [
    ('{"max_batch": 8}', "unknown key 'max_batch'"),
    ('{"dynamic_batching": {"max_queue_delay_ms": 8}}', "unknown key 'dynamic_batching.max_queue_delay_ms'"),
    ('{"max_batch_size": 0}', "max_batch_size: Input should be greater than or equal to 1"),
    ('{"max_batch_size": true}', "max_batch_size: must be an integer, not true/false"),
    ('{"max_batch_size": "lots"}', "max_batch_size: Input should be a valid integer"),
    ('{"max_batch_size": 4, "dynamic_batching": {"preferred_batch_size": [8]}}', "is over max_batch_size 4"),
    ('{"instance_group": [{"count": 1}, {"count": 2}]}', "instance_group: List should have at most 1 item"),
    ('{"instance_group": [{"kind": "KIND_TPU"}]}', "instance_group.0.kind"),
    ('{"instance_group": [{"gpus": [1]}]}', "CUDA_VISIBLE_DEVICES"),
    ('{"dynamic_batching": {"default_queue_policy": {"timeout_action": "DELAY"}}}', "timeout_action"),
    ('{"execution": "parallel"}', "execution: Input should be 'fused' or 'members'"),
    ('{"members": "most"}', "members takes 'cascade', 'full', 'front' or a number"),
    ('{"target_accuracy": 1.5}', "target_accuracy: Input should be less than or equal to 1"),
    ('{"version_policy": {"newest": {}}}', "version_policy must be one of"),
    ('{"platform": "tensorrt_plan"}', "platform"),
    ('{"name": "other"}', "is not the ensemble's folder name 'm'"),
    ('[1, 2]', "must be a JSON object"),
    ('{"max_batch_size": 4,', "is not JSON"),
])
def test_a_wrong_key_or_value_is_named(text: str, named: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse(text, "m/config.json", "m")
    assert str(refused.value).startswith("m/config.json") and named in str(refused.value), str(refused.value)


def test_every_wrong_key_is_named_at_once() -> None:
    with pytest.raises(ConfigError) as refused:
        parse('{"max_batch": 8, "drift_window": -1, "session_threads": "x"}', "m/config.json", "m")
    assert all(key in str(refused.value) for key in ("'max_batch'", "drift_window", "session_threads"))


KEYS = ["max_batch_size", "dynamic_batching", "preferred_batch_size", "max_queue_delay_microseconds",
        "default_queue_policy", "max_queue_size", "default_timeout_microseconds", "timeout_action",
        "allow_timeout_override", "instance_group", "count", "kind", "gpus", "name", "version_policy", "latest",
        "num_versions", "specific", "versions", "all", "execution", "precision", "members", "degrade_queue_ms",
        "session_threads", "target_accuracy", "calibration_window", "drift_window", "platform", "backend"]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                    st.text(max_size=12),
                    st.sampled_from(["KIND_CPU", "members", "fused", "int8", "cascade", "REJECT"]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), inner, max_size=4), max_leaves=12)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=6) | VALUES)
def test_any_json_is_settings_or_a_config_error_naming_the_file(document: object) -> None:
    """Whatever a config.json holds, the server gets settings or one ConfigError: never another exception."""
    text = json.dumps(document)  # NaN and Infinity included, as Python's json writes and reads them
    try:
        parse(text, "m/config.json", "m")
    except ConfigError as error:
        assert str(error).startswith("m/config.json")


def test_a_config_file_past_the_size_bound_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text('{"max_batch_size": 8, "name": "' + "x" * MAX_CONFIG_BYTES + '"}')
    with pytest.raises(ConfigError, match=rf"is {path.stat().st_size} bytes, more than the {MAX_CONFIG_BYTES}"):
        read_config(path)
    path.write_text('{"max_batch_size": 8}')
    assert read_config(path) == {"max_batch_size": 8}
