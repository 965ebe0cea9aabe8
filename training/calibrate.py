"""Temperature scaling of an ensemble (Guo et al. 2017): one scalar T > 0 dividing every
member's logits before its softmax, fitted by minimising the ensemble's NLL on held-out data."""

from __future__ import annotations

import math

import numpy as np
import torch


def ensemble_log_probabilities(member_logits: torch.Tensor, temperature: torch.Tensor | float) -> torch.Tensor:
    """log of the mean over members of softmax(logits / T): [K, N, C] -> [N, C]."""
    log_probabilities = torch.log_softmax(member_logits / temperature, dim=-1)
    return torch.logsumexp(log_probabilities, dim=0) - math.log(member_logits.shape[0])


def tempered_ensemble_probabilities(member_logits: np.ndarray, temperature: float) -> np.ndarray:
    """The calibrated ensemble's probabilities [N, C] from member logits [K, N, C]."""
    logits = torch.as_tensor(member_logits, dtype=torch.float64)
    return ensemble_log_probabilities(logits, temperature).exp().numpy()


def fit_temperature(member_logits: np.ndarray, labels: np.ndarray) -> float:
    """The T minimising the NLL of the averaged tempered softmax on (logits [K, N, C], labels [N])."""
    logits = torch.as_tensor(member_logits, dtype=torch.float64)
    targets = torch.as_tensor(labels, dtype=torch.int64)
    if logits.ndim != 3 or logits.shape[1] != targets.shape[0] or targets.shape[0] == 0:
        raise ValueError(f"expected member logits [K, N, C] and labels [N], got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")
    # Optimise log T: T stays positive and the problem is better conditioned.
    log_temperature = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_temperature], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        log_p = ensemble_log_probabilities(logits, log_temperature.exp())
        loss = torch.nn.functional.nll_loss(log_p, targets)
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    optimizer.step(closure)  # type: ignore[no-untyped-call]
    temperature = float(log_temperature.detach().exp())
    if not math.isfinite(temperature):
        raise ValueError("temperature fitting diverged")
    return temperature
