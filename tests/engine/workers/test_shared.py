"""Batches through shared memory: what a worker copies out equals what was sent, a segment's
bytes are reused only once the rank has replied, and nothing is left in /dev/shm."""

import glob
import os

import numpy as np
import pytest

from skpipe.engine.workers import _protocol as P
from skpipe.engine.workers._shared import SHM_DIR, Inbox, Outbox, SharedArray

pytestmark = pytest.mark.skipif(not os.path.isdir(SHM_DIR), reason="no /dev/shm")


def ours():
    return set(glob.glob(os.path.join(SHM_DIR, "skpipe-batch-*")))


@pytest.fixture(autouse=True)
def no_segment_left():
    """Whatever a test leaves in /dev/shm (it failed halfway) is removed after it."""
    before = ours()
    yield
    for path in ours() - before:
        os.unlink(path)


def step(x, y=None):
    return P.Step(x, np.arange(4) if y is None else y, 4)


def test_large_arrays_travel_by_reference_and_come_back_equal():
    before = ours()
    out, inbox = Outbox(2), Inbox()
    x = np.random.RandomState(0).randn(256, 128).astype(np.float32)  # 128 KiB
    packed = out.pack(1, P.AsyncStep(None, step(x), step(2 * x)))
    assert isinstance(packed.now.x, SharedArray) and isinstance(packed.ahead.x, SharedArray)
    assert not isinstance(packed.now.y, SharedArray)  # small: inside the message
    got = inbox.unpack(packed)
    np.testing.assert_array_equal(got.now.x, x)
    np.testing.assert_array_equal(got.ahead.x, 2 * x)
    assert got.now.x.dtype == np.float32 and got.now.x.flags.writeable
    out.acknowledged(1)
    assert ours() == before  # unlinked once the rank has replied (it has it mapped)
    again = out.pack(1, step(3 * x))  # the same segment, its bytes reused
    np.testing.assert_array_equal(inbox.unpack(again).x, 3 * x)
    out.close()
    assert ours() == before


def test_bytes_are_not_reused_before_the_rank_replies():
    out, inbox = Outbox(1), Inbox()
    x = np.ones((128, 256), np.float32)
    first = out.pack(0, step(x))
    # no reply yet: more batches go after it, and a full segment is replaced, not overwritten
    later = [out.pack(0, step(x * (k + 2))) for k in range(6)]
    np.testing.assert_array_equal(inbox.unpack(first).x, x)
    for k, message in enumerate(later):
        np.testing.assert_array_equal(inbox.unpack(message).x, x * (k + 2))
    out.acknowledged(0)
    out.close()


def test_other_messages_and_a_disabled_outbox_are_left_alone():
    x = np.zeros((512, 512), np.float32)
    setup_like = P.SetState({0: {"w": x}}, {})
    assert Outbox(1).pack(0, setup_like) is setup_like
    plain = Outbox(1, enabled=False).pack(0, step(x))
    assert plain.x is x


def test_a_segment_is_unlinked_once_its_worker_has_mapped_it():
    """A driver killed outright (no reply, no close) leaves nothing its worker has read."""
    before = ours()
    out, inbox = Outbox(1), Inbox()
    x = np.ones((128, 256), np.float32)
    packed = out.pack(0, step(x))
    assert ours() - before  # written, not yet read
    np.testing.assert_array_equal(inbox.unpack(packed).x, x)
    assert ours() == before  # the worker read it: the name is gone, no reply needed
    np.testing.assert_array_equal(inbox.unpack(out.pack(0, step(2 * x))).x, 2 * x)
    out.close()
