"""The step channel (worker/step_channel.py) without Ray: plans reach every rank unchanged, answers come
back in rank order, and every way a rank can fail (an error, its end, silence) surfaces as
StepChannelError; strangers without the executor's token are refused, and only numeric arrays travel.
The Ray executor over this channel is tested in tests/test_tensor_parallel.py.
"""

from __future__ import annotations

import socket
import struct
import threading

import numpy as np
import pytest

from hybrid_cache.plan import BatchPlan, CacheType, Conversion, SamplingParams, SequencePlan
from hybrid_cache.plan_codec import decode_plan, encode_plan, encode_sampled
from worker.step_channel import (
    _ARRAY,
    _HEAD,
    _PREFIX,
    _RECV_BYTES,
    MAX_HELLO_BYTES,
    StepChannelError,
    StepClient,
    StepServer,
    _frame,
    _read_message,
)

TOKEN = "executor-secret"
HELLO_TIMEOUT_S = 5.0


def a_plan() -> BatchPlan:
    return BatchPlan(
        [
            SequencePlan(3, [11, 12, 13], 0, CacheType.KV, [4, 5], SamplingParams(temperature=0.0)),
            SequencePlan(
                7, [21], 40, CacheType.HIDDEN, [1, 2, 9],
                SamplingParams(temperature=0.7, top_p=0.9, top_k=5, seed=2**63 - 1), Conversion([1], [6], 16),
            ),
        ],
        finished_seq_ids=[2, 5],
    )


class Rank:
    """A StepServer on loopback whose handler records the decoded plans and answers with seq ids + rank
    (after `hang` is set, when given and the plan has sequences; raising `fail`, when given)."""

    def __init__(self, rank: int, fail: Exception | None = None, hang: threading.Event | None = None) -> None:
        self.rank, self.fail, self.hang, self.plans = rank, fail, hang, []
        self.server = StepServer("127.0.0.1", TOKEN, self.handle, HELLO_TIMEOUT_S)

    def handle(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        plan = decode_plan(arrays)
        self.plans.append(plan)
        if self.hang is not None and plan.seqs:
            self.hang.wait()
        if self.fail is not None:
            raise self.fail
        return encode_sampled([s.seq_id * 10 + self.rank for s in plan.seqs])


@pytest.fixture
def ranks() -> list[Rank]:
    made: list[Rank] = []
    yield made
    for rank in made:
        rank.server.close()


def test_each_rank_gets_the_plan_unchanged_and_answers_in_rank_order(ranks: list[Rank]) -> None:
    ranks += [Rank(0), Rank(1)]
    assert all(r.server.address[0] == "127.0.0.1" for r in ranks)
    client = StepClient([r.server.address for r in ranks], TOKEN, timeout_s=30)
    try:
        for _ in range(3):  # the connection carries step after step
            answers = client.run(encode_plan(a_plan()))
            assert [a["tokens"].tolist() for a in answers] == [[30, 70], [31, 71]]
    finally:
        client.close()
    for rank in ranks:
        assert rank.plans == [a_plan()] * 3


def test_an_empty_step_travels(ranks: list[Rank]) -> None:
    ranks.append(Rank(0))
    client = StepClient([ranks[0].server.address], TOKEN, timeout_s=30)
    try:
        assert client.run(encode_plan(BatchPlan([], [4])))[0]["tokens"].tolist() == []
    finally:
        client.close()
    assert ranks[0].plans == [BatchPlan([], [4])]


def test_a_wrong_token_is_refused_and_the_executor_still_gets_in(ranks: list[Rank]) -> None:
    ranks.append(Rank(0))
    with pytest.raises(StepChannelError, match="could not open the step channel"):
        StepClient([ranks[0].server.address], "a guess", timeout_s=30)
    client = StepClient([ranks[0].server.address], TOKEN, timeout_s=30)
    try:
        assert client.run(encode_plan(a_plan()))[0]["tokens"].tolist() == [30, 70]
    finally:
        client.close()
    assert len(ranks[0].plans) == 1, "the stranger's connection must not have run anything"


def test_a_stranger_cannot_announce_a_large_greeting() -> None:
    """Until the token is checked a message is held to a greeting's size: no large buffer for strangers."""
    left, right = socket.socketpair()
    with left, right:
        left.sendall(_PREFIX.pack(MAX_HELLO_BYTES + 1, 8))
        with pytest.raises(ValueError, match="is not a step message"):
            _read_message(right, MAX_HELLO_BYTES)
    greeting = _frame("hello", text=TOKEN)
    assert len(greeting) <= MAX_HELLO_BYTES  # the executor's own greeting fits


def test_once_the_executor_is_in_nobody_else_can_connect(ranks: list[Rank]) -> None:
    ranks.append(Rank(0))
    client = StepClient([ranks[0].server.address], TOKEN, timeout_s=30)
    try:
        client.run(encode_plan(a_plan()))  # the server has accepted and closed its listener by now
        with pytest.raises(OSError):
            socket.create_connection(ranks[0].server.address, timeout=5).recv(1)
    finally:
        client.close()


def test_a_failing_rank_fails_the_step_with_its_error(ranks: list[Rank]) -> None:
    ranks += [Rank(0), Rank(1, fail=ValueError("bad block table\nsecond line"))]
    client = StepClient([r.server.address for r in ranks], TOKEN, timeout_s=30)
    try:
        with pytest.raises(StepChannelError, match=r"rank 1 failed the step: ValueError: bad block table$"):
            client.run(encode_plan(a_plan()))
    finally:
        client.close()


def test_a_rank_that_ends_fails_the_step_without_waiting_for_the_timeout(ranks: list[Rank]) -> None:
    hang = threading.Event()
    ranks += [Rank(0, hang=hang), Rank(1)]
    client = StepClient([r.server.address for r in ranks], TOKEN, timeout_s=3600)  # only the close can end it
    try:
        client.run(encode_plan(BatchPlan([], [])))  # both connected and serving (an empty plan does not hang)
        ranks[1].server.close()
        with pytest.raises(StepChannelError, match="rank 1 closed its step channel"):
            client.run(encode_plan(a_plan()))
    finally:
        hang.set()
        client.close()


def test_a_silent_rank_fails_the_step_after_the_timeout(ranks: list[Rank]) -> None:
    hang = threading.Event()
    ranks += [Rank(0), Rank(1, hang=hang)]
    client = StepClient([r.server.address for r in ranks], TOKEN, timeout_s=0.5)
    try:
        with pytest.raises(StepChannelError, match=r"rank\(s\) \[1\] did not answer within 0.5 s"):
            client.run(encode_plan(a_plan()))
    finally:
        hang.set()
        client.close()


PLAN_KIND = 2


def _raw(arrays: list[tuple[bytes, bytes, tuple[int, ...]]], body: bytes = b"", kind: int = PLAN_KIND) -> bytes:
    """A hand-made message: (name, dtype, shape) per array, then `body` as their bytes."""
    header = _HEAD.pack(kind, 0, len(arrays)) + b"".join(
        _ARRAY.pack(len(name), len(dtype), len(shape)) + name + dtype + struct.pack(f"<{len(shape)}Q", *shape)
        for name, dtype, shape in arrays
    )
    return _with_prefix(header, body)


def _with_prefix(header: bytes, body: bytes = b"") -> bytes:
    return _PREFIX.pack(len(header) + len(body), len(header)) + header + body


@pytest.mark.parametrize(
    ("message", "error"),
    [
        (_raw([(b"x", b"|O", (2,))], b"\0" * 16), "only numeric arrays travel"),
        (_raw([(b"x", b"|V8", (2,))], b"\0" * 16), "only numeric arrays travel"),
        (_raw([(b"x", b"no such", (2,))], b"\0" * 16), "no numeric dtype"),
        (_raw([(b"x", b"<i8", (4,))], b"\0" * 8), "runs past the end"),
        (_PREFIX.pack(1 << 40, 8), "is not a step message"),
        (_with_prefix(_HEAD.pack(PLAN_KIND, 0, 0) + b"\0" * 3), "malformed"),
        (_with_prefix(_HEAD.pack(PLAN_KIND, 0, 1)), "malformed"),
        (_with_prefix(b"\0" * 3), "malformed"),
        (_with_prefix(_HEAD.pack(PLAN_KIND, 1, 0) + b"\xff"), "malformed"),
        (_raw([], kind=200), "malformed"),
        (_raw([(b"x", b"<i8", (1,))], b"\0" * 8) * 2, "more than one message"),
    ],
    ids=["objects", "void", "unknown-dtype", "truncated", "oversized", "header-longer", "array-missing", "no-head",
         "text-not-utf8", "kind", "two-at-once"],
)
def test_only_well_formed_numeric_arrays_are_read(message: bytes, error: str) -> None:
    left, right = socket.socketpair()
    with left, right:
        left.sendall(message)
        with pytest.raises(ValueError, match=error):
            _read_message(right)


def test_arrays_keep_their_dtype_and_shape() -> None:
    left, right = socket.socketpair()
    arrays = {"a": np.arange(6, dtype=np.int8).reshape(2, 3), "b": np.array([0.1, 2**-60]), "c": np.zeros(0, np.int64)}
    with left, right:
        left.sendall(_frame("plan", arrays, text="x"))
        kind, text, got = _read_message(right)
    assert (kind, text) == ("plan", "x")
    for name, array in arrays.items():
        assert got[name].dtype == array.dtype and np.array_equal(got[name], array)


def test_a_message_longer_than_one_read_arrives_whole() -> None:
    """A long prefill's plan takes several reads; a message split anywhere, even in its prefix, is read whole."""
    left, right = socket.socketpair()
    arrays = {"ints": np.arange(3 * _RECV_BYTES // 8, dtype=np.int64)}
    frame = _frame("plan", arrays)
    received: list[tuple[str, str, dict[str, np.ndarray]]] = []
    with left, right:
        reader = threading.Thread(target=lambda: received.append(_read_message(right)))
        reader.start()
        left.sendall(frame[:5])  # part of the prefix first
        threading.Event().wait(0.05)
        left.sendall(frame[5:])
        reader.join(timeout=30)
    assert received and received[0][0] == "plan"
    assert np.array_equal(received[0][2]["ints"], arrays["ints"])
