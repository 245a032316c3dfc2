"""A VM that outlives its host: continuous checkpoints to object storage and the
lease that lets at most one copy run (docs/checkpoints.md).

- :mod:`~drafter.checkpoint.records`: small records with conditional writes
  (``Records``; ``ObjectRecords`` over S3);
- :mod:`~drafter.checkpoint.lease`: the lease state machine (``Lease``).
"""

from drafter.checkpoint.lease import Lease, LeaseFenced, LeasePhase, LeaseRecord
from drafter.checkpoint.records import ObjectRecords, Record, RecordConflict, Records

__all__ = [
    "Lease",
    "LeaseFenced",
    "LeasePhase",
    "LeaseRecord",
    "ObjectRecords",
    "Record",
    "RecordConflict",
    "Records",
]
