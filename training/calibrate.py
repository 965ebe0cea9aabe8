"""Temperature scaling of an ensemble (Guo et al. 2017): one scalar T > 0 dividing every
member's logits before its softmax, fitted by minimising the ensemble's NLL on held-out data."""

from __future__ import annotations

import math

import numpy as np
import torch

from artefact.calibration import fit_temperature as fit


def ensemble_log_probabilities(member_logits: torch.Tensor, temperature: torch.Tensor | float) -> torch.Tensor:
    """log of the mean over members of softmax(logits / T): [N, K, C] -> [N, C]."""
    log_probabilities = torch.log_softmax(member_logits / temperature, dim=-1)
    return torch.logsumexp(log_probabilities, dim=1) - math.log(member_logits.shape[1])


def tempered_ensemble_probabilities(member_logits: np.ndarray, temperature: float) -> np.ndarray:
    """The calibrated ensemble's probabilities [N, C] from member logits [N, K, C]."""
    logits = torch.as_tensor(member_logits, dtype=torch.float64)
    return ensemble_log_probabilities(logits, temperature).exp().numpy()


def fit_temperature(member_logits: np.ndarray, labels: np.ndarray) -> float:
    """The T minimising the NLL of the averaged tempered softmax on (logits [N, K, C], labels [N]): the server's
    fit (`artefact.calibration.fit_temperature`)."""
    return fit(np.asarray(member_logits), labels)
