"""JSON nested around the deepest the contract accepts (core/payload.py: MAX_DEPTH), over MQTT through the
real broker and ingest, then one real `rpm pipeline run`. JSON readers and writers recurse, and how deep they
may go depends on how deep the caller already is: a batch item the decode task read at one stack depth is
written again (its ``raw``, for the quarantine) by the load at another — hence a fixed limit well inside the
interpreter's. Every message must end loaded or quarantined with a reason, the run green and the accounting
balanced, whatever the depth."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta

import pytest

from core.payload import MAX_DEPTH
from core.settings import Settings
from rpmctl.tools.publish import DevicePublisher, wait_until
from tests.conftest import rpm, rpm_json
from tests.integration.test_hostile_input import enrol, landed

pytestmark = pytest.mark.integration


def test_items_nested_near_the_recursion_limit_are_quarantined_and_the_run_green(stack: Settings):
    s = stack
    cuff, _ = enrol(s)
    start = datetime.now(UTC) - timedelta(hours=5)
    at = (datetime.now(UTC) - timedelta(minutes=5)).isoformat(timespec="seconds")
    payloads = []
    for depth in range(MAX_DEPTH - 100, MAX_DEPTH + 101, 4):  # as deep as the item may go, and beyond
        nested = "[" * depth + "]" * depth
        good = f'{{"msg_id":"ok-{depth}","metric":"heart_rate","value":70,"unit":"/min","measured_at":"{at}"}}'
        # item 1 breaks a rule (no metric): quarantined, its raw rebuilt at the load from the message
        bad = f'{{"msg_id":"bad-{depth}","value":70,"unit":"/min","measured_at":"{at}","x":{nested}}}'
        payloads.append(f'{{"readings":[{good},{bad}]}}'.encode())
        payloads.append(f'{{"msg_id":"one-{depth}","metric":"heart_rate","unit":"/min","measured_at":"{at}",'
                        f'"x":{nested}}}'.encode())  # a single reading without a value
    payloads += [f'{{"msg_id":"fine-{i}","metric":"heart_rate","value":{60 + i % 40},"unit":"/min",'
                 f'"measured_at":"{start + timedelta(minutes=i):%Y-%m-%dT%H:%M:%SZ}"}}'.encode() for i in range(200)]  # the quarantine stays under 50 %
    with DevicePublisher(s, "hx-cuff", cuff["password"]) as dev:
        for p in payloads:
            dev.publish(p)
        assert dev.wait_all() == len(payloads)
    wait_until(lambda: landed(s) >= len(payloads), 30, what="ingest to land the messages")

    proc = rpm(s, "pipeline", "run", check=False, timeout=600)
    assert proc.returncode == 0 and re.fullmatch(r"rpm_pipeline \S+: success \((\w+ (success|skipped), ){8}\w+ success\)",
                                                 proc.stdout.splitlines()[0]), proc.stdout + proc.stderr
    acc = rpm_json(s, "accounting")
    assert acc["balanced"] is True, acc
    assert acc["received"] == acc["loaded"] + acc["quarantined"] + acc["duplicates"], acc
    assert acc["quarantined"] >= 51, acc  # every bad item and single reading, or its whole message
    assert acc["loaded"] >= 200, acc
    assert json.dumps(acc).count("Traceback") == 0
