from __future__ import annotations

import pytest

from artefact.policy import PolicyError, VersionPolicy


@pytest.mark.parametrize(("text", "on_disk", "candidates", "wanted"), [
    ("latest:1", [1, 2, 3], [3, 2, 1], 1),
    ("latest:2", [3, 1, 2], [3, 2, 1], 2),
    ("all", [1, 2], [2, 1], 64),
    ("specific:1,3", [1, 2, 3], [3, 1], 64),
    ("specific:7", [1, 2], [], 64),
])
def test_a_policy_chooses_its_candidates_newest_first(text: str, on_disk: list[int], candidates: list[int],
                                                      wanted: int) -> None:
    policy = VersionPolicy.parse(text)
    assert policy.candidates(on_disk) == candidates and policy.wanted == wanted
    assert VersionPolicy.parse(str(policy)) == policy


@pytest.mark.parametrize("text", ["latest:0", "latest:x", "all:3", "specific:", "specific:0", "newest", "latest:99"])
def test_bad_policies_are_refused(text: str) -> None:
    with pytest.raises(PolicyError, match="version policy"):
        VersionPolicy.parse(text)


def test_triton_json_configs() -> None:
    assert VersionPolicy.from_config('{"version_policy": {"latest": {"num_versions": 2}}}', "c") \
        == VersionPolicy("latest", 2)
    assert VersionPolicy.from_config('{"version_policy": {"specific": {"versions": [3, 1]}}}', "c") \
        == VersionPolicy("specific", versions=(1, 3))
    assert VersionPolicy.from_config('{"version_policy": {"all": {}}}', "c") == VersionPolicy("all")
    assert VersionPolicy.from_config("{}", "c") is None


@pytest.mark.parametrize(("text", "words"), [
    ("not json", "not JSON"),
    ("[1]", "JSON object"),
    ('{"max_batch_size": 8}', "only 'version_policy'"),
    ('{"version_policy": {"latest": {"num_versions": true}}}', "must be one of"),
    ('{"version_policy": {"specific": {"versions": ["1"]}}}', "must be one of"),
    ('{"version_policy": {"latest": {}, "all": {}}}', "must be one of"),
    ('{"version_policy": {"specific": {"versions": []}}}', "name 1 to 64"),
    ("[" * 100_000, "not JSON"),
])
def test_bad_json_configs_say_what_is_wrong(text: str, words: str) -> None:
    with pytest.raises(PolicyError, match=words):
        VersionPolicy.from_config(text, "c")
