"""A device-side MQTT 5 publisher (simulator, tests, benchmarks) that checks every return and PUBACK.

paho's ``publish()`` returns an error code instead of raising when its queue is full (past 65,535
outstanding QoS 1 messages), and a broker ACL refusal arrives only as a PUBACK reason code: both are
checked here so no caller can believe a refused message was delivered.
"""

from __future__ import annotations

import threading
import time

import paho.mqtt.client as mqtt

from core.settings import Settings
from core.topics import vitals_topic
from ingest.service import make_client


class PublishError(RuntimeError):
    pass


class DevicePublisher:
    def __init__(self, s: Settings, device_id: str, password: str, *, tls: bool = False,
                 max_inflight: int = 100, topic: str | None = None, timeout: float = 30.0):
        # paho rescans its whole outgoing queue on every PUBACK: a window of 100 publishes 2x faster than 500
        # and 8x faster than 10,000 (BENCHMARKS.md, ingest).
        self.topic = topic or vitals_topic(device_id)
        self.timeout = timeout
        self.max_inflight = max_inflight
        self.client = make_client(f"dev-{device_id}", device_id, password,
                                  ca_file=str(s.ca_cert) if tls else None)
        self.client.max_inflight_messages_set(max_inflight)
        self.client.on_publish = self._on_publish
        self.client.on_connect = self._on_connect
        self._cv = threading.Condition()
        self._outstanding: set[int] = set()
        self._early: set[int] = set()
        self.acked = 0
        self.refused: list[tuple[int, str]] = []
        self._connected: bool | None = None
        self._connect_reason = ""
        host, port = (s.broker_host, s.broker_tls_port) if tls else (s.broker_host, s.broker_port)
        if tls and host == "127.0.0.1":
            host = "localhost"  # the name on the local server certificate
        self.client.connect(host, port, keepalive=30)
        self.client.loop_start()
        with self._cv:
            if not self._cv.wait_for(lambda: self._connected is not None, timeout):
                raise PublishError(f"{device_id}: no CONNACK within {timeout}s")
        if not self._connected:
            self.close()
            raise PublishError(f"{device_id}: broker refused the connection: {self._connect_reason}")

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        with self._cv:
            self._connected = not reason_code.is_failure
            self._connect_reason = str(reason_code)
            self._cv.notify_all()

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        with self._cv:
            if mid in self._outstanding:
                self._outstanding.discard(mid)
            else:
                self._early.add(mid)  # PUBACK beat publish() back to us
            if reason_code.is_failure:
                self.refused.append((mid, str(reason_code)))
            else:
                self.acked += 1
            self._cv.notify_all()

    def publish(self, payload: bytes, topic: str | None = None) -> int:
        with self._cv:
            if not self._cv.wait_for(lambda: len(self._outstanding) < self.max_inflight, self.timeout):
                raise PublishError("broker stopped acknowledging")
        # Not under our lock: paho may be inside on_publish (which takes it) while holding its own locks.
        info = self.client.publish(topic or self.topic, payload, qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise PublishError(f"publish failed: {mqtt.error_string(info.rc)}")
        with self._cv:
            if info.mid in self._early:
                self._early.discard(info.mid)
            else:
                self._outstanding.add(info.mid)
        return info.mid

    def wait_all(self, check: bool = True) -> int:
        """Wait for every PUBACK; returns how many were accepted. Raises on any refusal if ``check``."""
        with self._cv:
            if not self._cv.wait_for(lambda: not self._outstanding, self.timeout):
                raise PublishError(f"{len(self._outstanding)} messages never acknowledged")
        if check and self.refused:
            raise PublishError(f"broker refused {len(self.refused)} message(s): {self.refused[0][1]}")
        return self.acked

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> DevicePublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_until(predicate, timeout: float, interval: float = 0.05, what: str = "condition") -> None:
    """Poll ``predicate`` until true; used to wait on observable state, never a fixed sleep."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
