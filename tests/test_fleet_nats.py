"""The collector on a real nats-server cluster (no kernel needed): a record
JetStream delivered to it but that never reached it (a fetch that timed out, a
reconnection) comes again by redelivery before its gap is taken as lost."""
from __future__ import annotations

import asyncio
import os

import pytest

from agentwarden import fleet
from agentwarden.archive.segments import read_items
from agentwarden.archive.verify import verify
from agentwarden.daemon import fleet_collector
from fleet_cluster import NATS_SERVER, NatsCluster
from test_fleet import KEY, shipped_messages, write_archive

HOST = "web-1"
ADMIN = "alice"


@pytest.fixture
def cluster(tmp_path):
    if not os.path.exists(NATS_SERVER):
        pytest.fail("nats-server is missing (make setup installs Debian's nats-server)")
    c = NatsCluster(tmp_path / "nats", [HOST], [ADMIN])
    c.start()
    yield c
    c.stop()


async def _connect(cluster: NatsCluster, user: str):
    nats = fleet.nats_module()
    return await nats.connect(fleet.servers(cluster.url),
                              **fleet.connect_options(fleet.load_credentials(cluster.credentials(user))))


async def _lose_then_collect(cluster: NatsCluster, messages: list, central) -> dict:
    from nats.js import api
    collector_nc = await _connect(cluster, "collector")
    js = collector_nc.jetstream(timeout=10)
    await fleet_collector.ensure_fleet(js, 3)
    host_nc = await _connect(cluster, HOST)
    host_js = host_nc.jetstream(timeout=10)
    for i, message in enumerate(messages):
        await host_js.publish(fleet.record_subject(HOST, None, "gap"), message.data,
                              headers={"Nats-Msg-Id": fleet.message_id(HOST, i)})
    await host_nc.close()
    # The collector's consumer delivers the first five records to a fetch whose answer is lost.
    sub = await js.pull_subscribe(
        f"{fleet.RECORD_PREFIX}.>", durable=fleet.COLLECTOR_DURABLE, stream=fleet.STREAM,
        config=api.ConsumerConfig(ack_policy=api.AckPolicy.EXPLICIT, ack_wait=fleet_collector.ACK_WAIT,
                                  max_ack_pending=100_000, deliver_policy=api.DeliverPolicy.ALL))
    lost = await sub.fetch(5, timeout=5)
    assert [fleet.decode_shipped(m.data).seq for m in lost] == [0, 1, 2, 3, 4]
    await collector_nc.close()
    stop = asyncio.Event()
    task = asyncio.create_task(fleet_collector.run_collector(
        cluster.url, fleet.load_credentials(cluster.credentials("collector")), central, 3, stop))
    last = len(messages) - 1
    for _ in range(int(fleet_collector.GAP_WAIT * 4 / 0.2)):
        await asyncio.sleep(0.2)
        if (central / HOST).is_dir() and any(i.seq == last for i in read_items(central / HOST)):
            break
    stop.set()
    return (await task).state()


def test_a_record_delivered_but_lost_on_the_way_comes_again_before_its_gap_is_declared(cluster, tmp_path):
    write_archive(tmp_path / "host", 30)
    messages = shipped_messages(tmp_path / "host")
    assert len(messages) == 30
    state = asyncio.run(_lose_then_collect(cluster, messages, tmp_path / "central"))
    assert [i.seq for i in read_items(tmp_path / "central" / HOST)] == list(range(30)), state
    assert state["counters"]["missing"] == 0 and state["counters"]["gaps"] == 0, state
    assert verify(tmp_path / "central" / HOST, key=KEY).ok


async def _publish_and_follow(cluster: NatsCluster, count: int, size: int) -> int:
    """count records of size bytes published by the host; how many an admin's
    ordered consumer (what `fleet tail` uses) reads from the start."""
    from nats.js import api
    collector_nc = await _connect(cluster, "collector")
    await fleet_collector.ensure_fleet(collector_nc.jetstream(timeout=10), 3)
    await collector_nc.close()
    host_nc = await _connect(cluster, HOST)
    host_js = host_nc.jetstream(timeout=30)
    body = b"x" * size
    for start in range(0, count, 500):
        acks = [await host_js.publish_async(fleet.record_subject(HOST, None, "gap"), body,
                                            headers={"Nats-Msg-Id": fleet.message_id(HOST, i)})
                for i in range(start, min(count, start + 500))]
        await asyncio.gather(*acks)
    await host_nc.close()
    admin_nc = await _connect(cluster, ADMIN)
    sub = await admin_nc.jetstream().subscribe(f"{fleet.RECORD_PREFIX}.>", ordered_consumer=True,
                                               config=api.ConsumerConfig(deliver_policy=api.DeliverPolicy.ALL))
    seen = 0
    while seen < count:
        try:
            await sub.next_msg(timeout=10)
        except Exception:   # nothing for 10 s: the consumer stalled
            break
        seen += 1
    await admin_nc.close()
    return seen


def test_an_admins_ordered_consumer_reads_a_large_stream_without_stalling(cluster):
    """Flow control asks the consumer to answer on $JS.FC; an admin account
    without that permission stalls after some megabytes."""
    count = 30_000
    assert asyncio.run(_publish_and_follow(cluster, count, 1024)) == count


async def _bucket_keys(cluster: NatsCluster) -> set[str] | None:
    """The bucket's keys as `fleet holds` lists them (the stream's subject
    counts; an admin may not watch the bucket with a consumer of its own), or
    None when the cluster did not answer in 10 s: the caller asks again."""
    from nats.js.errors import KeyDeletedError, KeyNotFoundError
    nc = await _connect(cluster, ADMIN)
    prefix = f"$KV.{fleet.HOLDS_BUCKET}."
    try:
        js = nc.jetstream(timeout=10)
        info = await asyncio.wait_for(js.stream_info(f"KV_{fleet.HOLDS_BUCKET}", subjects_filter=prefix + ">"), 10)
        kv = await js.key_value(fleet.HOLDS_BUCKET)
        keys = set()
        for subject in info.state.subjects or {}:
            try:
                await kv.get(subject[len(prefix):])
            except (KeyDeletedError, KeyNotFoundError):   # a tombstone: deleted
                continue
            keys.add(subject[len(prefix):])
        return keys
    except asyncio.TimeoutError:
        return None
    finally:
        await nc.close()


def _keys_now(cluster: NatsCluster, deadline: float) -> set[str]:
    import time as clock
    while (keys := asyncio.run(_bucket_keys(cluster))) is None:
        assert clock.monotonic() < deadline, "the holds bucket could not be listed"
    return keys


def test_a_restarted_shipper_deletes_the_hold_keys_of_its_last_run(cluster, tmp_path):
    """The host's account may not list the bucket: a restarted daemon deletes
    the keys its state file names (those under a former fleet_host are not its
    own to delete: skipped, not retried forever) and goes on publishing holds."""
    import time as clock

    from agentwarden.daemon.fleet import HOLD_KEYS_FILE, FleetShipper
    from agentwarden.settings import Settings

    async def setup():
        nc = await _connect(cluster, "collector")
        await fleet_collector.ensure_fleet(nc.jetstream(timeout=10), 3)
        await nc.close()
        nc = await _connect(cluster, HOST)
        # A host publishes its keys (it may not ask for the bucket's info, as key_value() does).
        await nc.jetstream(timeout=10).publish(f"$KV.{fleet.HOLDS_BUCKET}.{fleet.hold_key(HOST, 'h1-dead')}",
                                               b'{"state": "pending"}')
        await nc.close()
    asyncio.run(setup())
    assert fleet.hold_key(HOST, "h1-dead") in _keys_now(cluster, clock.monotonic() + 30)
    state = tmp_path / "state"
    state.mkdir()
    (state / HOLD_KEYS_FILE).write_text(
        '{"keys": ["%s", "former-name.h1-other"]}' % fleet.hold_key(HOST, "h1-dead"))
    settings = Settings(state_dir=state, run_dir=tmp_path / "run", fleet_url=cluster.url, fleet_host=HOST,
                        fleet_credentials=cluster.credentials(HOST))
    shipper = FleetShipper(settings, tmp_path / "archive")
    shipper.start()
    try:
        deadline = clock.monotonic() + 30
        while fleet.hold_key(HOST, "h1-dead") in _keys_now(cluster, deadline):
            assert clock.monotonic() < deadline, shipper.last_error
            clock.sleep(0.3)
        shipper.hold({"hold_id": "h2-new", "agent": "bot", "session": "s-1", "on_behalf_of": "", "task": "",
                      "action": "exec date", "rule": "exec.hold", "required": 1, "approvers": [],
                      "time": clock.time_ns(), "state": "pending"})
        while fleet.hold_key(HOST, "h2-new") not in _keys_now(cluster, deadline):
            assert clock.monotonic() < deadline, shipper.last_error
            clock.sleep(0.3)
        assert fleet.hold_key(HOST, "h2-new") in (state / HOLD_KEYS_FILE).read_text()
        assert "former-name" not in (state / HOLD_KEYS_FILE).read_text()
    finally:
        shipper.stop()


async def _destructive_attempts(cluster: NatsCluster, user: str) -> dict[str, str]:
    """What user gets asking JetStream to erase the fleet's trail: each outcome's text."""
    nc = await _connect(cluster, user)
    js = nc.jetstream(timeout=1)   # a refused request is never answered
    attempts = {
        "delete the records stream": js.delete_stream(fleet.STREAM),
        "purge the records stream": js.purge_stream(fleet.STREAM),
        "delete a record": js.delete_msg(fleet.STREAM, 1),
        "delete the holds bucket": js.delete_stream(f"KV_{fleet.HOLDS_BUCKET}"),
        "purge the hosts bucket": js.purge_stream(f"KV_{fleet.HOSTS_BUCKET}"),
        "delete the collector's consumer": js.delete_consumer(fleet.STREAM, fleet.COLLECTOR_DURABLE),
    }
    outcomes = {}
    try:
        for name, attempt in attempts.items():
            try:
                outcomes[name] = f"done: {await attempt}"
            except Exception as exc:
                outcomes[name] = f"{exc.__class__.__name__}: {exc}"
    finally:
        await nc.close()
    return outcomes


def test_neither_an_admin_nor_the_collector_can_erase_the_stream_the_buckets_or_the_consumer(cluster, tmp_path):
    """Admins read and decide, the collector consumes: neither account may
    delete or purge the records, the buckets or the collector's durable
    consumer (their JetStream API is allowed by name, never `$JS.API.>`)."""
    async def setup() -> int:
        nc = await _connect(cluster, "collector")
        js = nc.jetstream(timeout=10)
        await fleet_collector.ensure_fleet(js, 3)
        sub = await js.pull_subscribe(f"{fleet.RECORD_PREFIX}.>", durable=fleet.COLLECTOR_DURABLE,
                                      stream=fleet.STREAM)
        await nc.close()
        nc = await _connect(cluster, HOST)
        await nc.jetstream(timeout=10).publish(f"{fleet.RECORD_PREFIX}.{HOST}.bot.exec", b"a record")
        await nc.close()
        return 1 if sub else 0
    assert asyncio.run(setup()) == 1
    for user in (ADMIN, "collector"):
        outcomes = asyncio.run(_destructive_attempts(cluster, user))
        for name, outcome in outcomes.items():
            assert not outcome.startswith("done"), (user, name, outcome)
        assert f'Publish Violation - User "{user}", Subject "$JS.API.STREAM.DELETE.{fleet.STREAM}"' \
            in cluster.server_log()

    async def still_there() -> tuple[int, int]:
        nc = await _connect(cluster, ADMIN)
        js = nc.jetstream(timeout=10)
        info = await js.stream_info(fleet.STREAM)
        consumer = await js.consumer_info(fleet.STREAM, fleet.COLLECTOR_DURABLE)
        await nc.close()
        return info.state.messages, consumer.num_pending
    assert asyncio.run(still_there()) == (1, 1)
