"""The MQTT client's bounded buffering, against a broker on loopback that accepts the connection
and then never acknowledges a publication (written here from the MQTT 3.1.1 spec, so it is not
the code under test). The conversation with a real broker is in
``tests/integration/test_mqtt_devices.py``."""

from __future__ import annotations

import functools

import trio

from edge.mqtt import MqttClient

CONNACK_ACCEPTED = b"\x20\x02\x00\x00"  # MQTT 3.1.1 section 3.2: type 2, length 2, rc 0


async def silent_broker(nursery: trio.Nursery) -> int:
    """A broker that answers CONNECT and swallows everything after it; its port."""

    async def handle(stream: trio.SocketStream) -> None:
        await stream.receive_some()
        await stream.send_all(CONNACK_ACCEPTED)
        while await stream.receive_some():
            pass

    serve = functools.partial(trio.serve_tcp, handle, 0, host="127.0.0.1")
    listeners = await nursery.start(serve)
    return listeners[0].socket.getsockname()[1]


async def test_publications_waiting_for_their_puback_are_bounded(nursery: trio.Nursery) -> None:
    port = await silent_broker(nursery)
    client = MqttClient(f"mqtt://127.0.0.1:{port}", max_queued=3)
    assert client.publish("t", b"early") is None  # not connected: nothing queued
    nursery.start_soon(client.run)
    with trio.fail_after(5):
        await client.wait_connected()
    queued = [client.publish("t", f"{n}".encode()) for n in range(5)]
    assert [mid is not None for mid in queued] == [True, True, True, False, False]
    # A batch finds the buffer full: refused at once, not waited for.
    with trio.fail_after(1):
        assert await client.publish_all([("t", b"late"), ("t", b"later")]) == [False, False]


async def test_a_confirmed_publication_waits_for_its_puback(nursery: trio.Nursery) -> None:
    port = await silent_broker(nursery)
    client = MqttClient(f"mqtt://127.0.0.1:{port}")
    nursery.start_soon(client.run)
    with trio.fail_after(5):
        await client.wait_connected()
    with trio.move_on_after(0.3) as waited:
        await client.publish_confirmed("t", b"x")
    assert waited.cancelled_caught  # the broker never acknowledged it
    assert client.connected
