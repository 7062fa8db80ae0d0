"""The output lock (storymem_model/output_lock.py) on local folders and on S3 (moto server)."""
from __future__ import annotations

import threading
import time

import pytest

from storymem_model.output_lock import LockLostError, OutputLock, OutputLockedError, read_lock


@pytest.fixture(params=["local", "s3"])
def out(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out")
    return request.getfixturevalue("s3_bucket") + "/out"


def test_only_one_of_many_contenders_gets_the_lock(out):
    winners, refused = [], []
    barrier = threading.Barrier(6)

    def contend(i):
        barrier.wait()
        try:
            winners.append(OutputLock(out, owner=f"run-{i}", ttl_s=30).acquire())
        except OutputLockedError as exc:
            refused.append(exc)

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1 and len(refused) == 5
    holder = winners[0]
    assert read_lock(out)["owner"] == holder.owner
    assert all(holder.owner in str(exc) and "locked" in str(exc) for exc in refused)
    holder.release()
    assert read_lock(out) is None
    with OutputLock(out, owner="next run", ttl_s=30):  # free again
        assert read_lock(out)["owner"] == "next run"


def test_lease_is_renewed_while_held(out):
    with OutputLock(out, owner="long run", ttl_s=0.6) as lock:
        first = read_lock(out)["expires_at"]
        time.sleep(1.0)  # longer than the lease: only renewals keep it
        assert lock.held and read_lock(out)["expires_at"] > first
        with pytest.raises(OutputLockedError):
            OutputLock(out, owner="intruder", ttl_s=30).acquire()


def test_expired_lease_of_a_dead_run_is_taken_over(out):
    dead = OutputLock(out, owner="crashed run", ttl_s=0.3).acquire()
    dead._stop.set()  # the process "died": no more renewals
    time.sleep(0.5)
    with OutputLock(out, owner="next night", ttl_s=30):
        assert read_lock(out)["owner"] == "next night"
        with pytest.raises(LockLostError):
            dead.renew()
        dead.release()  # must not delete the new holder's lock
        assert read_lock(out)["owner"] == "next night"


def test_waiting_for_the_lock(out):
    holder = OutputLock(out, owner="short run", ttl_s=30).acquire()
    threading.Timer(0.4, holder.release).start()
    started = time.monotonic()
    with OutputLock(out, owner="patient run", ttl_s=30, wait_s=10, poll_s=0.1):
        assert read_lock(out)["owner"] == "patient run"
    assert time.monotonic() - started < 5


def test_bad_ttl_is_refused(tmp_path):
    with pytest.raises(ValueError, match="ttl_s"):
        OutputLock(str(tmp_path), ttl_s=0)


# ---------------------------------------------------------------------------------------
# The holder's process: a killed holder on this machine is taken over at once.
def _holder_process(out: str, hold_s: float):
    """A separate process that takes the lock, then holds it `hold_s` seconds (0: exits at
    once without releasing, like a killed render)."""
    import os
    import subprocess
    import sys

    code = ("import os, sys, time\n"
            "from storymem_model.output_lock import OutputLock\n"
            f"lock = OutputLock({out!r}, owner='process holder', ttl_s=60).acquire()\n"
            "print('held', flush=True)\n"
            f"time.sleep({hold_s})\n"
            "os._exit(0)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            env=dict(os.environ))
    assert proc.stdout.readline().strip() == b"held"
    return proc


def test_a_holder_whose_process_is_gone_is_taken_over_at_once(out):
    holder = _holder_process(out, hold_s=0)
    holder.wait(timeout=60)
    record = read_lock(out)
    assert record["owner"] == "process holder" and record["process"]["pid"] == holder.pid
    assert record["expires_at"] > time.time() + 30  # not expired: only its process is gone
    started = time.monotonic()
    with OutputLock(out, owner="the rerun", ttl_s=30):
        assert read_lock(out)["owner"] == "the rerun"
    assert time.monotonic() - started < 10


def test_a_live_holder_in_another_process_keeps_the_lock(out):
    holder = _holder_process(out, hold_s=60)
    try:
        with pytest.raises(OutputLockedError, match="process holder"):
            OutputLock(out, owner="intruder", ttl_s=30).acquire()
    finally:
        holder.kill()
        holder.wait()


def test_a_holder_on_another_machine_is_never_declared_gone(out):
    from storymem_model.output_lock import holder_is_gone, process_identity

    mine = process_identity()
    assert not holder_is_gone({"process": mine})  # this very process runs
    elsewhere = {**mine, "host": mine["host"] + "-other", "pid": 2 ** 22 + 7}
    assert not holder_is_gone({"process": elsewhere})
    assert not holder_is_gone({"process": {**mine, "boot_id": "another boot",
                                           "pid": 2 ** 22 + 7}})
    assert not holder_is_gone({"owner": "an old record without a process"})
    assert holder_is_gone({"process": {**mine, "pid": 2 ** 22 + 7}})  # no such pid here
    assert holder_is_gone({"process": {**mine, "started": mine["started"] - 1}})  # reused pid


# ---------------------------------------------------------------------------------------
# Hand-over: a flow gives its lease to the batch it starts; no second lock, no gap.
def test_a_handed_over_lease_is_taken_with_its_token_and_nobody_else_gets_it(out):
    flow = OutputLock(out, owner="flow", ttl_s=0.6).acquire()
    token = flow.hand_over()
    assert not flow.held and read_lock(out)["owner"] == "flow"
    with pytest.raises(OutputLockedError, match="'flow'"):
        OutputLock(out, owner="intruder", ttl_s=30).acquire()
    batch = OutputLock(out, owner="batch of the flow", ttl_s=0.6, token=token).acquire()
    assert read_lock(out)["owner"] == "batch of the flow"
    time.sleep(1.2)  # past the TTL: the batch renews it, the flow no longer does
    assert batch.held and read_lock(out)["owner"] == "batch of the flow"
    flow.release()  # taken over: the flow leaves it alone
    assert read_lock(out)["owner"] == "batch of the flow"
    with pytest.raises(OutputLockedError):
        OutputLock(out, owner="intruder", ttl_s=30).acquire()
    batch.release()
    assert read_lock(out) is None


def test_a_lease_handed_to_nobody_is_released_by_its_holder(out):
    flow = OutputLock(out, owner="flow", ttl_s=30).acquire()
    flow.hand_over()
    flow.release()  # the batch never started
    assert read_lock(out) is None
    lost = OutputLock(out, owner="stalled", ttl_s=30).acquire()
    lost._lost = True
    with pytest.raises(LockLostError):
        lost.hand_over()
    lost.release()
