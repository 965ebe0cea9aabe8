"""The classification extension: an output's top classes as Triton's "score:index:label" strings.

A client asks for it per output (`class_count`: gRPC's `classification` int64 parameter, HTTP's
`"classification": N` in the output's parameters). The output then comes back as BYTES
[B, min(N, C)] in place of its scores: per image, the N highest scores in falling order (equal
scores by class index), each as the score written as C's `%f` (what Triton writes), the class
index and the class name from the manifest, joined by colons. 0 asks for the plain output, as in
Triton. `probabilities` holds one score per class; `prediction_set` is answered the same way with
only the classes in each image's set, by falling probability (rows of smaller sets end in empty
strings). The other outputs hold one value per image (or per member and class), whose "top
classes" would name the wrong classes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from service.errors import InvalidInput

PARAMETER = "classification"
CLASSIFIABLE = ("probabilities", "prediction_set")


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
                           f"{' and '.join(repr(name) for name in CLASSIFIABLE)}, which hold a value per class; "
                           f"'{output}' does not")
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


def set_classes(sets: np.ndarray, probabilities: np.ndarray, count: int, labels: Sequence[str]) -> np.ndarray:
    """The classification extension for prediction sets: per image, the classes in its set by falling probability,
    as "probability:index:label" bytes, up to `count`; rows with fewer classes are padded with b"". [B,
    min(count, C)]."""
    batch, classes = sets.shape
    keep = min(count, classes)
    order = np.argsort(-np.where(sets, probabilities, -1.0), axis=1, kind="stable")[:, :keep]
    strings = np.full((batch, keep), b"", dtype=object)
    for row in range(batch):
        for column, index in enumerate(order[row]):
            if sets[row, index]:
                name = f":{labels[index]}" if index < len(labels) and labels[index] else ""
                strings[row, column] = f"{probabilities[row, index]:f}:{index}{name}".encode()
    return strings
