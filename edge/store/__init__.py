"""The edge store (KubeEdge's "metamanager"): desired state, the downstream high-water mark, the
upstream outbox and the agent's own state, in one SQLite database that is the edge's single
source of truth.

``store`` holds ``Store``, the one writer; ``outbox`` the queueing, coalescing and drop rules for
upstream reports; ``schema`` the migrations.
"""

from edge.store.outbox import DROP_ORDER, ReportResult
from edge.store.store import (
    ApplyResult,
    InvalidMessageError,
    SchemaTooNewError,
    SequenceGapError,
    Store,
    StoreError,
)

__all__ = [
    "DROP_ORDER",
    "ApplyResult",
    "InvalidMessageError",
    "ReportResult",
    "SchemaTooNewError",
    "SequenceGapError",
    "Store",
    "StoreError",
]
