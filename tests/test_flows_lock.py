"""The output lock (flows/output_lock.py) on local folders and on S3 (moto server)."""
from __future__ import annotations

import threading
import time

import pytest

from flows.output_lock import LockLostError, OutputLock, OutputLockedError, read_lock


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
