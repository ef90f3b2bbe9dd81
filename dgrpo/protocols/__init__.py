"""Wire protocol between the learner, rollout workers and judges (no Ray imports)."""

from dgrpo.protocols.codec import CodecError, decode, encode
from dgrpo.protocols.messages import (
    MESSAGE_TYPES,
    SCHEMA_VERSION,
    MetricsRecord,
    RolloutBatch,
    RolloutRequest,
    ScoredBatch,
    WeightSnapshot,
)
from dgrpo.protocols.rollout_log import (
    RolloutLogWriter,
    format_summary,
    read_rollout_log,
    summarize_rollout_log,
)

__all__ = [
    "MESSAGE_TYPES",
    "SCHEMA_VERSION",
    "CodecError",
    "MetricsRecord",
    "RolloutBatch",
    "RolloutLogWriter",
    "RolloutRequest",
    "ScoredBatch",
    "WeightSnapshot",
    "decode",
    "encode",
    "format_summary",
    "read_rollout_log",
    "summarize_rollout_log",
]
