"""The event log (metering/eventlog.py) against real nats-servers of the test's own: one server
with JetStream (the ``event_log`` fixture: a stream of the test's own), or a 3-node cluster at
replication 3 whose stream leader is SIGKILLed while a thread publishes."""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from conftest import wait_for
from metering import eventlog
from metering.tests.nats_harness import NatsCluster, NatsServer, nats_server_binary


def read_all(expected: int, seconds: float = 120) -> list[eventlog.LogMessage]:
    """Every message the consumer hands out until ``expected`` came (or ``seconds`` passed),
    each acknowledged."""
    messages: list[eventlog.LogMessage] = []
    deadline = time.monotonic() + seconds
    while len(messages) < expected and time.monotonic() < deadline:
        try:
            batch = eventlog.fetch(500, timeout=2)
        except eventlog.LogUnavailable:
            continue
        for message in batch:
            message.ack()
        messages += batch
    return messages


def test_a_publish_is_acknowledged_with_its_stream_sequence(event_log: str) -> None:
    published = [eventlog.publish(f"batch {i}".encode(), msg_id=f"batch-{i}") for i in range(3)]

    assert published == [eventlog.Published(seq=i, duplicate=False) for i in (1, 2, 3)]
    state = eventlog.stream_info()
    assert (state.messages, state.first_seq, state.last_seq) == (3, 1, 3)
    assert state.leader == "n1"


def test_ensure_stream_is_idempotent_and_follows_the_settings(event_log: str, settings: Any) -> None:
    eventlog.publish(b"kept", msg_id="kept")
    eventlog.ensure_stream()
    settings.METERING_LOG_RETENTION_HOURS = 24
    eventlog.ensure_stream()  # updated in place: nothing is lost

    assert eventlog.stream_info().messages == 1


def test_the_same_msg_id_is_stored_once_and_answers_the_first_sequence(event_log: str) -> None:
    first = eventlog.publish(b"payload", msg_id="acc_1:batch-7")
    eventlog.publish(b"another", msg_id="acc_1:batch-8")
    again = eventlog.publish(b"payload re-sent", msg_id="acc_1:batch-7")

    assert first == eventlog.Published(seq=1, duplicate=False)
    assert again == eventlog.Published(seq=1, duplicate=True)
    assert eventlog.stream_info().messages == 2
    assert [(m.seq, m.msg_id, m.data) for m in read_all(2)] == [
        (1, "acc_1:batch-7", b"payload"),
        (2, "acc_1:batch-8", b"another"),
    ]


def test_the_consumer_hands_out_exactly_what_was_published(event_log: str) -> None:
    sent = {f"m{i}": os.urandom(100 + i) for i in range(120)}
    seqs = {msg_id: eventlog.publish(data, msg_id=msg_id).seq for msg_id, data in sent.items()}

    received = read_all(len(sent))

    assert {m.msg_id: (m.seq, m.data) for m in received} == {k: (seqs[k], sent[k]) for k in sent}
    assert len(received) == len(sent)
    assert eventlog.fetch(10, timeout=0.5) == []
    consumer = eventlog.consumer_info()
    assert (consumer.num_pending, consumer.num_ack_pending) == (0, 0)


def test_a_large_batch_fits_and_a_larger_one_is_refused(event_log: str, settings: Any) -> None:
    big = os.urandom(6 * 1024 * 1024)
    assert eventlog.publish(big, msg_id="big").seq == 1
    assert read_all(1)[0].data == big

    with pytest.raises(eventlog.MessageTooLarge):
        eventlog.publish(b"x" * (settings.METERING_LOG_MAX_MESSAGE_BYTES + 1), msg_id="too-big")
    assert eventlog.stream_info().messages == 1


def test_a_message_not_acknowledged_comes_back_after_the_ack_wait(event_log: str, settings: Any) -> None:
    settings.METERING_LOG_ACK_WAIT_SECONDS = 1
    eventlog.publish(b"first", msg_id="first")
    eventlog.publish(b"second", msg_id="second")

    taken = eventlog.fetch(2, timeout=5)
    assert [m.msg_id for m in taken] == ["first", "second"]
    taken[1].ack()  # the first is "lost" by its sink: never acknowledged

    again: list[eventlog.LogMessage] = []
    deadline = time.monotonic() + 60
    while not again and time.monotonic() < deadline:
        again = eventlog.fetch(10, timeout=2)
    assert [(m.seq, m.msg_id, m.data) for m in again] == [(1, "first", b"first")]
    assert again[0].num_delivered == 2
    again[0].ack()
    assert eventlog.fetch(10, timeout=1.5) == []  # acknowledged: gone for good (ack wait 1 s)
    assert eventlog.consumer_info().num_ack_pending == 0


def test_nak_hands_a_message_back_and_in_progress_keeps_it(event_log: str, settings: Any) -> None:
    settings.METERING_LOG_ACK_WAIT_SECONDS = 2
    eventlog.publish(b"one", msg_id="one")

    [message] = eventlog.fetch(1, timeout=5)
    message.in_progress()
    message.nak()
    [back] = read_all(1)

    assert (back.seq, back.msg_id, back.num_delivered) == (1, "one", 2)
    assert eventlog.consumer_info().num_ack_pending == 0


def test_no_server_is_unavailable_within_the_ack_timeout_then_connects_when_one_starts(
    settings: Any, tmp_path: Path
) -> None:
    if nats_server_binary() is None:
        pytest.skip("needs nats-server")
    server = NatsServer(name="late", root=tmp_path, binary=str(nats_server_binary()))
    settings.METERING_LOG_URLS = [server.url]  # nothing listens there yet
    settings.METERING_LOG_STREAM = "LATE"
    settings.METERING_LOG_SUBJECT = "late.events"
    settings.METERING_LOG_ACK_TIMEOUT_SECONDS = 1
    outcome: list[BaseException | eventlog.Published] = []

    def attempt() -> None:
        try:
            outcome.append(eventlog.publish(b"x", msg_id="x"))
        except BaseException as exc:
            outcome.append(exc)

    try:
        thread = threading.Thread(target=attempt)
        thread.start()
        thread.join(timeout=120)  # minutes would be a hang: it answers after its ack timeout
        assert not thread.is_alive()
        [error] = outcome
        assert isinstance(error, eventlog.LogUnavailable)
        assert error.retry_after >= 1

        server.start()
        server.wait_ready()
        deadline = time.monotonic() + 60
        published = None
        while published is None and time.monotonic() < deadline:
            try:
                eventlog.ensure_stream()
                published = eventlog.publish(b"x", msg_id="x")
            except eventlog.LogUnavailable:
                time.sleep(0.2)
        assert published == eventlog.Published(seq=1, duplicate=False)
    finally:
        eventlog.close()
        server.stop()


def test_a_forked_child_publishes_on_a_connection_of_its_own(event_log: str) -> None:
    assert eventlog.publish(b"parent before", msg_id="parent-1").seq == 1
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            published = eventlog.publish(b"child", msg_id="child-1")
            os.write(write_end, f"{published.seq}".encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    child_said = os.read(read_end, 100).decode()
    os.close(read_end)

    assert os.waitstatus_to_exitcode(status) == 0
    assert child_said == "2"
    assert eventlog.publish(b"parent after", msg_id="parent-2").seq == 3  # the parent's connection still works
    assert [m.msg_id for m in read_all(3)] == ["parent-1", "child-1", "parent-2"]


def test_every_acknowledged_message_survives_a_sigkill_of_the_stream_leader_once(
    nats_cluster: NatsCluster, clustered_event_log: str
) -> None:
    stream = clustered_event_log
    acked: dict[str, int] = {}  # msg_id -> seq, for every PubAck
    refusals = Counter[str]()
    stop = threading.Event()
    failure: list[BaseException] = []

    def publish_numbered() -> None:
        i = 0
        try:
            while not stop.is_set():
                msg_id = f"n{i}"
                try:
                    acked[msg_id] = eventlog.publish(f"message {i}".encode() * 20, msg_id=msg_id).seq
                    i += 1
                except eventlog.LogUnavailable as exc:
                    refusals[exc.reason] += 1
                    time.sleep(0.05)  # and again, with the same msg_id
        except BaseException as exc:
            failure.append(exc)

    publisher = threading.Thread(target=publish_numbered)
    publisher.start()
    try:
        assert wait_for(lambda: len(acked) >= 300, 120), "publishing did not start"
        leader = nats_cluster.wait_stream_leader(stream)
        leader.kill()
        before_kill = len(acked)
        new_leader = nats_cluster.wait_stream_leader(stream, seconds=120, other_than=leader.name)
        assert wait_for(lambda: len(acked) >= before_kill + 300, 180), "publishing did not resume"
    finally:
        stop.set()
        publisher.join(timeout=60)
    assert not failure, failure

    leader.start()  # the killed node comes back and catches up
    nats_cluster.wait_ready()
    stored = read_all(len(acked))
    counts = Counter(m.msg_id for m in stored)

    assert new_leader.name != leader.name
    assert all(counts[msg_id] == 1 for msg_id in acked), ([k for k in acked if counts[k] != 1][:10], refusals)
    assert max(counts.values()) == 1  # a message whose PubAck was lost is stored at most once too
    assert {m.msg_id: m.seq for m in stored if m.msg_id in acked} == acked
    assert sorted(int(k[1:]) for k in counts) == list(range(len(counts)))  # no gap in what was stored
