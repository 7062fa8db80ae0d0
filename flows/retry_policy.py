"""Which failures a flow task retries (with exponential backoff) and which it does not.

Transient: storage or network trouble (connection resets, timeouts, throttling, a Ray
cluster that is not reachable yet). Not transient: bad input (a wrong source URI, a bad
model flag, a missing file) - retrying cannot fix those, so the task fails at once with the
original, clear message.
"""
from __future__ import annotations

import errno

from prefect.tasks import exponential_backoff

from storymem_model.storage import StorageError

PERMANENT_OS_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError,
                       NotADirectoryError, PermissionError)
TRANSIENT_ERRNOS = {errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.ETIMEDOUT,
                    errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EPIPE, errno.EAGAIN,
                    errno.EBUSY, errno.EIO}


def is_transient(exc: BaseException | None) -> bool:
    """True for failures that may well pass when tried again a little later."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, PERMANENT_OS_ERRORS):
            return False
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return True
        if _is_transient_library_error(exc):
            return True
        if isinstance(exc, OSError) and (exc.errno in TRANSIENT_ERRNOS or exc.errno is None):
            return True
        if isinstance(exc, StorageError) and exc.__cause__ is None:
            return "cannot read" in str(exc)
        exc = exc.__cause__ or exc.__context__
    return False


def _is_transient_library_error(exc: BaseException) -> bool:
    name = type(exc).__name__
    module = type(exc).__module__ or ""
    if module.startswith(("botocore", "aiobotocore", "urllib3", "requests", "aiohttp")):
        return name not in ("NoCredentialsError", "ParamValidationError", "NoSuchBucket")
    # Ray job client: "Failed to connect to Ray at address ..." is a ConnectionError;
    # a job server answering 5xx while starting up is a RuntimeError with the status code.
    if module.startswith("ray") or name == "RuntimeError":
        text = str(exc)
        return any(f"status code {code}" in text for code in (500, 502, 503, 504))
    return False


def retry_transient(task, task_run, state) -> bool:
    """Prefect `retry_condition_fn`: retry only transient failures."""
    exc = state.data if isinstance(getattr(state, "data", None), BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except Exception as error:  # the result itself could not be read
            exc = error
    return is_transient(exc) if isinstance(exc, BaseException) else False


def retry_options(retries: int, backoff_s: float) -> dict:
    """`task.with_options(**retry_options(3, 10))`: 10 s, 20 s, 40 s, with 20% jitter."""
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    if backoff_s < 0:
        raise ValueError(f"retry backoff must be >= 0 seconds, got {backoff_s}")
    return {"retries": retries,
            "retry_delay_seconds": exponential_backoff(backoff_s) if retries else 0,
            "retry_jitter_factor": 0.2 if backoff_s else None,
            "retry_condition_fn": retry_transient}
