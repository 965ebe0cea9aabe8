"""The ensemble's outputs from its members' probabilities, in numpy.

The fused graph computes the same quantities inside onnxruntime (training's `FusedEnsemble`,
in torch); this module is what the server's per-member execution and training's evaluation
use, and the definitions are the same: entropy in nats with probabilities floored at
`LOG_FLOOR` before the log, mutual information as the entropy of the mean minus the mean
member entropy (clipped at 0), disagreement as the fraction of members whose own top class
differs from the ensemble's. Member probabilities are laid out [..., K, C] (members, then
classes), the layout of the `member_probabilities` output.

An image a cascade's front network answered (`artefact.cascade`) went through no member: its
`members_used` is `FRONT` (0), its member probabilities are zero, and its probabilities are the
front's. Recomputing its outputs (at another temperature, say) takes those served probabilities
as the one network that answered (`with_front`).
"""

from __future__ import annotations

import numpy as np

# Probabilities are clipped before the log so a confidently wrong prediction costs a large
# but finite NLL or entropy instead of inf. Training and the fused graph use the same floor.
LOG_FLOOR = 1e-12
FRONT = 0
"""Members used by an image the front network answered."""


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


def outputs_by_members(member_probabilities: np.ndarray, used: np.ndarray) -> dict[str, np.ndarray]:
    """Every output of images answered by different numbers of members: member probabilities [B, K, C] (zero for
    members an image did not go through), `used` [B] the first members that answered each; each group of images
    by the members it used."""
    counts = np.unique(used)
    if len(counts) == 1:
        results = ensemble_outputs(member_probabilities[:, :counts[0]])
    else:
        results = {}
        for count in counts:
            rows = np.flatnonzero(used == count)
            for name, value in ensemble_outputs(member_probabilities[rows, :count]).items():
                if name == "member_probabilities":
                    continue
                if name not in results:
                    results[name] = np.empty((len(used), *value.shape[1:]), dtype=value.dtype)
                results[name][rows] = value
    results["member_probabilities"] = member_probabilities
    return results


def retempered(member_probabilities: np.ndarray, used: np.ndarray, ratio: float) -> np.ndarray:
    """Member probabilities [B, K, C] served at temperature T, as they would be at T / `ratio`: softmax(ratio *
    log p) is softmax(logits / T * ratio), since log p is the logits over T less a constant. Members an image did
    not go through stay zero."""
    floor = np.asarray(LOG_FLOOR, dtype=np.float64)
    scaled = softmax(np.log(np.maximum(member_probabilities.astype(np.float64), floor)) * ratio)
    answered = np.arange(member_probabilities.shape[1])[None, :] < np.asarray(used)[:, None]
    result: np.ndarray = np.where(answered[..., None], scaled, 0.0).astype(member_probabilities.dtype)
    return result


def with_front(member_probabilities: np.ndarray, used: np.ndarray, probabilities: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
    """Member probabilities [B, K, C] and members used [B] in which an image the front network answered (`FRONT`)
    counts as answered by one network whose probabilities are the served ones [B, C]: what every recomputation of
    served outputs takes."""
    front = np.asarray(used) == FRONT
    if not front.any():
        return member_probabilities, used
    members = member_probabilities.copy()
    members[front, 0] = probabilities[front]
    return members, np.where(front, 1, used)


def outputs_at(member_probabilities: np.ndarray, used: np.ndarray, ratio: float, probabilities: np.ndarray
               ) -> dict[str, np.ndarray]:
    """Every output of members served at temperature T, as they would be at T / `ratio` (`retempered`; as served
    at ratio 1), each image by the members it used; `probabilities` [B, C] as served, for the images the front
    network answered (its temperature scales by the same ratio)."""
    members, counts = with_front(member_probabilities, used, probabilities)
    tempered = members if ratio == 1.0 else retempered(members, counts, ratio)
    return outputs_by_members(tempered, counts)
