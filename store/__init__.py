"""The durable store: predictions, feedback, the audit trail (one vocabulary: Event) and image blobs."""

from store.blobs import BlobStore
from store.events import LOOP_EVENTS, RETRAIN_ENDINGS, Event
from store.schema import (
                          AuditEvent,
                          Feedback,
                          Prediction,
                          StoreUnavailable,
                          UnknownFeedback,
                          UnknownPrediction,
                          make_engine,
)
from store.store import Store
from store.writer import NotRecorded

__all__ = ["LOOP_EVENTS", "RETRAIN_ENDINGS", "AuditEvent", "BlobStore", "Event", "Feedback", "NotRecorded",
           "Prediction", "Store", "StoreUnavailable", "UnknownFeedback", "UnknownPrediction", "make_engine"]
