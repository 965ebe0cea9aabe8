"""The ensemble's outputs from its members' probabilities, in numpy.

The fused graph computes the same quantities inside onnxruntime (training's `FusedEnsemble`,
in torch); this module is what the server's per-member execution and training's evaluation
use, and the definitions are the same: entropy in nats with probabilities floored at
`LOG_FLOOR` before the log, mutual information as the entropy of the mean minus the mean
member entropy (clipped at 0), disagreement as the fraction of members whose own top class
differs from the ensemble's. Member probabilities are laid out [..., K, C] (members, then
classes), the layout of the `member_probabilities` output.
"""

from __future__ import annotations

import numpy as np

# Probabilities are clipped before the log so a confidently wrong prediction costs a large
# but finite NLL or entropy instead of inf. Training and the fused graph use the same floor.
LOG_FLOOR = 1e-12


def entropy(probabilities: np.ndarray) -> np.ndarray:
    """Entropy (nats) of each row of probabilities [..., C], in the input's float precision."""
    floor = np.asarray(LOG_FLOOR, dtype=probabilities.dtype)
    result: np.ndarray = -np.sum(probabilities * np.log(np.maximum(probabilities, floor)), axis=-1)
    return result


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis (classes), in the logits' float precision."""
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    result: np.ndarray = shifted / shifted.sum(axis=-1, keepdims=True)
    return result


def mutual_information(member_probabilities: np.ndarray) -> np.ndarray:
    """Epistemic uncertainty H(mean_k p_k) - mean_k H(p_k) (nats, clipped at 0) of member probabilities [..., K, C]."""
    return _epistemic(entropy(member_probabilities.mean(axis=-2)), member_probabilities)


def _epistemic(total_entropy: np.ndarray, member_probabilities: np.ndarray) -> np.ndarray:
    """Mutual information from the entropy of the members' mean, already computed."""
    result: np.ndarray = np.maximum(total_entropy - entropy(member_probabilities).mean(axis=-1), 0.0)
    return result


def ensemble_outputs(member_probabilities: np.ndarray) -> dict[str, np.ndarray]:
    """Every ensemble output for member probabilities [B, K, C] (float32), by output name."""
    probabilities = member_probabilities.mean(axis=1)
    predicted = probabilities.argmax(axis=-1).astype(np.int64)
    total = entropy(probabilities)
    disagreement = (member_probabilities.argmax(axis=-1) != predicted[:, None]).mean(axis=1)
    return {
        "probabilities": probabilities,
        "predicted_class": predicted,
        "confidence": probabilities.max(axis=-1),
        "entropy": total,
        "mutual_information": _epistemic(total, member_probabilities).astype(np.float32),
        "member_disagreement": disagreement.astype(np.float32),
        "member_probabilities": member_probabilities,
    }
