"""The tokens file and the bearer metadata, parsed the way the server parses them."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.errors import PermissionDenied, Unauthenticated
from service.transport.security import Authorizer, Tokens, TokensFileError, bearer_token, parse_tokens

TOKEN = "a-token-of-twenty-chars"


def test_lines_comments_and_roles() -> None:
    entries = parse_tokens(f"# header\n\n{TOKEN} infer,feedback  # trailing comment\nanother-token-0000000 admin\n")
    assert [sorted(caller.roles) for _, caller in entries] == [["feedback", "infer"], ["admin"]]
    assert all(TOKEN not in caller.principal for _, caller in entries), "the principal is a digest, not the token"


@pytest.mark.parametrize(("text", "problem"), [
    (f"{TOKEN}\n", "line 1: expected"),
    (f"# c\n{TOKEN} infer root\n", "line 2: expected"),
    (f"{TOKEN} superuser\n", "unknown role superuser"),
    ("short infer\n", "at least 16"),
    ("# only a comment\n", "no tokens"),
])
def test_a_bad_file_names_its_line(text: str, problem: str) -> None:
    with pytest.raises(TokensFileError, match=problem):
        parse_tokens(text)


def test_bearer_metadata_and_roles(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"{TOKEN} feedback\n")
    authorizer = Authorizer(Tokens(path))
    assert bearer_token((("Authorization", f"bearer {TOKEN}"),)) == TOKEN.encode()
    assert bearer_token((("authorization", TOKEN),)) is None, "the scheme is required"
    assert authorizer.check("Report", (("authorization", f"Bearer {TOKEN}"),)).roles == {"feedback"}
    assert authorizer.check("ModelMetadata", (("authorization", f"Bearer {TOKEN}"),))
    with pytest.raises(PermissionDenied, match="'infer' role"):
        authorizer.check("ModelInfer", (("authorization", f"Bearer {TOKEN}"),))
    for metadata in ((), (("authorization", "Bearer nope-nope-nope-nope"),), (("authorization", "Bearer  "),)):
        with pytest.raises(Unauthenticated):
            authorizer.check("ModelMetadata", metadata)
