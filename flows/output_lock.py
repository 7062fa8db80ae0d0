"""The output lock, as the flows import it: `pipelines.batch.output_lock` (the batch driver
takes it too, and `pipelines` cannot import `flows`). See that module for who takes it,
hand-over to a batch and the take-over of a holder whose process is gone."""
from __future__ import annotations

from pipelines.batch.output_lock import (DEFAULT_TTL_S, LOCK_FOLDER, LockLostError, OutputLock,
                                         OutputLockedError, default_owner, holder_is_gone,
                                         lock_uri, process_identity, read_lock)

__all__ = ["DEFAULT_TTL_S", "LOCK_FOLDER", "LockLostError", "OutputLock", "OutputLockedError",
           "default_owner", "holder_is_gone", "lock_uri", "process_identity", "read_lock"]
