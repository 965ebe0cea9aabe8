"""The classification extension: an output's top classes as Triton's "score:index:label" strings.

A client asks for it per output (`class_count`: gRPC's `classification` int64 parameter, HTTP's
`"classification": N` in the output's parameters). The output then comes back as BYTES
[B, min(N, C)] in place of its scores: per image, the N highest scores in falling order (equal
scores by class index), each as the score written as C's `%f` (what Triton writes), the class
index and the class name from the manifest, joined by colons. 0 asks for the plain output, as in
Triton. Only `probabilities` holds one score per class; the other outputs hold one value per
image (or per member and class), whose "top classes" would name the wrong classes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from service.errors import InvalidInput

PARAMETER = "classification"
CLASSIFIABLE = ("probabilities",)


def class_count(output: str, value: object) -> int:
    """The `classification` parameter of `output` as a class count (0: none), or `InvalidInput` saying why not."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"output '{output}': parameter '{PARAMETER}' (class_count) must be an integer number of "
                           f"classes, got {type(value).__name__} {str(value)[:40]!r}")
    if value < 0:
        raise InvalidInput(f"output '{output}': parameter '{PARAMETER}' (class_count) must be 0 (no classification) "
                           f"or a positive number of classes, got {value}")
    if value and output not in CLASSIFIABLE:
        raise InvalidInput(f"output '{output}': classification (class_count) applies to "
                           f"{', '.join(repr(name) for name in CLASSIFIABLE)}, the ensemble's score per class; "
                           f"'{output}' holds no score per class")
    return value


def top_classes(scores: np.ndarray, count: int, labels: Sequence[str]) -> np.ndarray:
    """The `count` best classes of each row of `scores` [B, C] as "score:index:label" bytes, [B, min(count, C)]."""
    batch, classes = scores.shape
    keep = min(count, classes)
    # Descending by score, ties by index: a stable sort of the negated scores.
    order = np.argsort(-scores, axis=1, kind="stable")[:, :keep]
    names = [f":{label}" if label else "" for label in labels] + [""] * max(0, classes - len(labels))
    strings = np.empty((batch, keep), dtype=object)
    for row in range(batch):
        for column, index in enumerate(order[row]):
            strings[row, column] = f"{scores[row, index]:f}:{index}{names[index]}".encode()
    return strings
