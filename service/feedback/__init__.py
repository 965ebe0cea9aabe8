"""Feedback: served predictions kept for their labels, labels joined to them, live calibration from the labels.

`core` holds the types and the `Store` interface; `memory` the store of one process, `sql` the one
in SQLite or PostgreSQL that a fleet shares, `writer` the queue that keeps databases off the
request path, `urls` the `--feedback-store` URLs, and `loop` one server's side of it all.
"""

from service.feedback.core import Joined, Label, LabelledWindow, Prediction, Served, Store
from service.feedback.loop import MAX_LABELS, CalibrationWindow, Feedback
from service.feedback.memory import MemoryStore
from service.feedback.urls import StoreConfigError, open_store, redact

__all__ = ["MAX_LABELS", "CalibrationWindow", "Feedback", "Joined", "Label", "LabelledWindow", "MemoryStore",
           "Prediction", "Served", "Store", "StoreConfigError", "open_store", "redact"]
