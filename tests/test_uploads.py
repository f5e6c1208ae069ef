"""Bounded background uploads (vlmstream/dataset/uploads.py), apart from any store."""

import threading
import time

import pytest

from vlmstream.dataset.uploads import Uploads


def test_no_more_than_in_flight_uploads_run_at_once_and_finish_waits_for_all():
    running, most, done, lock = [0], [0], [], threading.Lock()

    def upload(n):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.01)
        with lock:
            running[0] -= 1
            done.append(n)

    up = Uploads(2, "test-upload")
    for n in range(8):
        up.submit(upload, n)
    up.finish()
    assert sorted(done) == list(range(8)) and most[0] == 2


def test_a_failed_upload_is_raised_at_a_later_submit_or_at_finish():
    def fail(name):
        raise OSError(f"{name} refused")

    up = Uploads(1, "test-upload")
    with pytest.raises(OSError, match="a refused"):
        up.submit(fail, "a")
        for _ in range(100):  # the writer goes on; the error comes out at the first call after the failure
            up.submit(time.sleep, 0.001)
        up.finish()
    up.stop()
    up = Uploads(2, "test-upload")
    up.submit(fail, "b")
    with pytest.raises(OSError, match="b refused"):
        up.finish()
    up.stop()
