"""A real MQTT broker (``mosquitto``) on loopback for tests, and paho helpers to talk to it.

- ``Mosquitto``: the Debian ``mosquitto`` binary on a free 127.0.0.1 port, configured by a file
  in a temporary directory (one listener, anonymous access, no persistence). Started and stopped
  by synchronous code, so fixtures of any scope can share it; ``stop()``/``start()`` again on the
  same port lets a test cut the broker away and bring it back.
- ``mosquitto`` (fixture): one broker per test.
- ``TestClient``: a paho client on its own network thread (``loop_start``) for the test side of a
  conversation: ``subscribe`` then ``await expect(topic)``, ``publish``. Test code only, and on
  purpose not the product's client (``edge.mqtt``, paho driven from trio without threads): the
  peer a test checks against is independent of the code under test.

Every wait is bounded: a test that waits for a message that never comes fails with what it did
receive instead of hanging.
"""

from __future__ import annotations

import contextlib
import json
import queue
import re
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
import trio

from tests.waiting import eventually, eventually_sync

MOSQUITTO_BIN = Path(shutil.which("mosquitto") or "/usr/sbin/mosquitto")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Mosquitto:
    """``mosquitto -c <tmp>/mosquitto.conf`` listening on ``127.0.0.1:<port>``."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self._dir = Path(tempfile.mkdtemp(prefix="outpost-mosquitto-"))
        self.config = self._dir / "mosquitto.conf"
        self.log_path = self._dir / "mosquitto.log"
        self.config.write_text(
            f"listener {self.port} {self.host}\n"
            "allow_anonymous true\n"
            "persistence false\n"
            "log_dest stderr\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
        )
        self._process: subprocess.Popen[bytes] | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        if not MOSQUITTO_BIN.exists():
            pytest.fail(f"{MOSQUITTO_BIN} is missing: run `make setup`", pytrace=False)
        self._log = self.log_path.open("ab")
        self._process = subprocess.Popen(
            [str(MOSQUITTO_BIN), "-c", str(self.config)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

        def listening() -> bool:
            if self._process.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.log_path.read_text()}")
            with socket.create_connection((self.host, self.port), timeout=0.5):
                return True

        try:
            eventually_sync(
                listening, f"mosquitto listens on {self.port}", within=timeout, ignoring=(OSError,)
            )
        except AssertionError as exc:
            raise TimeoutError(f"{exc}; its log: {self.log_path.read_text()}") from exc

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=5)
            self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> Mosquitto:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture
def mosquitto() -> Iterator[Mosquitto]:
    with Mosquitto() as broker:
        yield broker


class TestClient:
    """The test's side of an MQTT conversation: a paho client with its own network thread.

    Received messages land in a thread-safe queue; ``expect`` takes them out in order, skipping
    (but remembering) those on other topics.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, broker: Mosquitto, client_id: str = "") -> None:
        self._messages: queue.Queue[paho.MQTTMessage] = queue.Queue()
        self.seen: list[tuple[str, bytes]] = []
        self._subscribed: queue.Queue[int] = queue.Queue()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id)
        self.client.on_message = lambda _c, _u, msg: self._messages.put(msg)
        self.client.on_subscribe = lambda _c, _u, mid, _rc, _p: self._subscribed.put(mid)
        connected = threading.Event()
        self.client.on_connect = lambda *_: connected.set()
        self.client.connect(broker.host, broker.port, keepalive=30)
        self.client.loop_start()
        # Publications made before the CONNACK may sit in paho's queue: wait for it (briefly).
        if not connected.wait(5):
            self.close()
            raise TimeoutError(f"no CONNACK from {broker.url}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> TestClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def subscribe(self, topic: str, qos: int = 1, within: float = 5.0) -> None:
        """Subscribe and wait for the broker's SUBACK, so nothing published after is missed."""
        _rc, mid = self.client.subscribe(topic, qos)

        def acknowledged() -> bool:
            with contextlib.suppress(queue.Empty):
                while True:
                    if self._subscribed.get_nowait() == mid:
                        return True
            return False

        await eventually(
            acknowledged, f"the broker acknowledges {topic!r}", within=within, interval=0.01
        )

    def publish(self, topic: str, payload: Any, qos: int = 1, retain: bool = False) -> None:
        if isinstance(payload, dict | list):
            payload = json.dumps(payload)
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(timeout=5)

    async def expect(self, topic: str, within: float = 5.0) -> paho.MQTTMessage:
        """The next message whose topic matches ``topic`` (MQTT wildcards allowed)."""
        pattern = _topic_regex(topic)

        def arrived() -> paho.MQTTMessage | None:
            with contextlib.suppress(queue.Empty):
                while True:
                    msg = self._messages.get_nowait()
                    self.seen.append((msg.topic, msg.payload))
                    if pattern.fullmatch(msg.topic):
                        return msg
            return None

        try:
            return await eventually(
                arrived, f"a message on {topic!r}", within=within, interval=0.01
            )
        except AssertionError:
            raise AssertionError(
                f"no message on {topic!r} within {within}s; seen: {self.seen}"
            ) from None

    async def expect_json(self, topic: str, within: float = 5.0) -> dict[str, Any]:
        return json.loads((await self.expect(topic, within)).payload)

    async def quiet(self, topic: str, seconds: float) -> None:
        """Assert nothing arrives on ``topic`` for ``seconds``."""
        with trio.move_on_after(seconds):
            msg = await self.expect(topic, within=seconds + 1)
            raise AssertionError(f"unexpected message on {msg.topic}: {msg.payload!r}")

    def drain(self) -> None:
        while True:
            try:
                msg = self._messages.get_nowait()
            except queue.Empty:
                return
            self.seen.append((msg.topic, msg.payload))


def _topic_regex(topic: str) -> re.Pattern[str]:
    """MQTT topic filter -> regex: ``+`` is one level, a trailing ``#`` is any (even no) levels."""
    levels = topic.split("/")
    tail = ""
    if levels[-1] == "#":
        levels, tail = levels[:-1], "(/.*)?" if len(levels) > 1 else ".*"
    body = "/".join("[^/]*" if level == "+" else re.escape(level) for level in levels)
    return re.compile(body + tail)
