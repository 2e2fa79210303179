"""The telehealth events suite: what a device status or patient-app event must satisfy to be reported.

Same machinery and guarantees as the clinical suite (expectations/suite.py): every failing row goes to
quarantine with every rule it broke, and a rule GX cannot evaluate fails the task.
"""

from __future__ import annotations

from typing import Any

from expectations.suite import Rule, run_suite
from transforms.events import APPOINTMENT_EVENTS, CHANNEL_EVENTS, EDUCATION_EVENTS, MODALITIES
from transforms.vocab import SOURCE_KINDS, kind_metric

# App events come from app logins; device status from device logins (the broker's ACL already keeps each kind
# to its topics; this is the same rule stated where the data is judged).
KIND_CHANNELS = sorted(kind_metric(k.name, "events" if k.app else "status") for k in SOURCE_KINDS.values())

SUITE_NAME = "telehealth_events"


def _when(events: tuple[str, ...]) -> dict[str, str]:
    return {"row_condition": " or ".join(f'event=="{e}"' for e in events), "condition_parser": "pandas"}


def rules(future_skew_s: int) -> list[Rule]:
    status = {"row_condition": 'event=="device_status"', "condition_parser": "pandas"}
    return [
        Rule("msg_id_present", "sources must label each message so retries can be traced",
             "ExpectColumnValuesToNotBeNull", {"column": "msg_id"}),
        Rule("optional_fields_typed", "a mistyped field (\"minutes\": \"12\") must not be dropped silently",
             "ExpectColumnValuesToBeNull", {"column": "mistyped"}),
        Rule("event_known_for_channel", "status topics carry device status; app topics carry app events",
             "ExpectColumnValuesToBeInSet", {"column": "channel_event", "value_set": CHANNEL_EVENTS}),
        Rule("source_kind_matches_channel", "only a registered app reports app events, only a device its status",
             "ExpectColumnValuesToBeInSet", {"column": "kind_channel", "value_set": KIND_CHANNELS,
                                             "row_condition": "device_known==True", "condition_parser": "pandas"}),
        Rule("occurred_at_rfc3339_with_offset", "an event without its UTC offset cannot be placed on a day",
             "ExpectColumnValuesToNotBeNull", {"column": "occurred_at"}),
        Rule("occurred_not_in_future", "a source clock running ahead must not report tomorrow's events",
             "ExpectColumnValuesToBeBetween", {"column": "seconds_ahead", "max_value": future_skew_s}),
        Rule("source_enrolled_at_event_time", "an event counts for the patient the source was enrolled to",
             "ExpectColumnValuesToNotBeNull",
             {"column": "patient_id", "row_condition": "has_time==True", "condition_parser": "pandas"}),
        Rule("education_module_present", "engagement is reported per module",
             "ExpectColumnValuesToNotBeNull", {"column": "module", **_when(EDUCATION_EVENTS)}),
        Rule("education_minutes_plausible", "minutes spent on one module: 0 to 10 hours",
             "ExpectColumnValuesToBeBetween",
             {"column": "minutes", "min_value": 0, "max_value": 600, **_when(EDUCATION_EVENTS)}),
        Rule("appointment_id_present", "attended/no-show rates follow each appointment",
             "ExpectColumnValuesToNotBeNull", {"column": "appointment_id", **_when(APPOINTMENT_EVENTS)}),
        Rule("appointment_modality_known", "completion and no-show rates are reported by modality",
             "ExpectColumnValuesToBeInSet",
             {"column": "modality", "value_set": list(MODALITIES), **_when(APPOINTMENT_EVENTS)}),
        Rule("appointment_modality_present", "an appointment without a modality cannot be reported",
             "ExpectColumnValuesToNotBeNull", {"column": "modality", **_when(APPOINTMENT_EVENTS)}),
        Rule("survey_present", "a completed survey names the instrument",
             "ExpectColumnValuesToNotBeNull", {"column": "survey", **_when(("survey_completed",))}),
        Rule("status_has_a_measurement", "a status message must report battery, signal, firmware or uptime",
             "ExpectColumnValuesToBeBetween", {"column": "status_fields", "min_value": 1, **status}),
        Rule("battery_in_range", "battery is a percentage", "ExpectColumnValuesToBeBetween",
             {"column": "battery_pct", "min_value": 0, "max_value": 100, **status}),
        Rule("signal_in_range", "received signal strength in dBm (-150 to 0)", "ExpectColumnValuesToBeBetween",
             {"column": "signal_dbm", "min_value": -150, "max_value": 0, **status}),
        Rule("uptime_not_negative", "uptime in seconds", "ExpectColumnValuesToBeBetween",
             {"column": "uptime_s", "min_value": 0, **status}),
    ]


# As the clinical suite's DERIVED_SQL: what the gate fetches ready from DuckDB.
DERIVED_SQL = {
    "device_known": "device_kind IS NOT NULL",
    "kind_channel": "coalesce(device_kind, 'None') || '|' || coalesce(channel, 'None')",
}


def validate(df: Any, future_skew_s: int) -> dict[str, list[str]]:
    """Rules each failing event broke, by row key (``df`` carries ``device_kind`` like the clinical suite's)."""
    if df.empty:
        return {}
    frame = df if set(DERIVED_SQL) <= set(df.columns) else df.assign(
        device_known=df["device_kind"].notna(),
        kind_channel=[kind_metric(k, c) for k, c in zip(df["device_kind"], df["channel"], strict=True)])
    return run_suite(frame, f"{SUITE_NAME}_{future_skew_s}", rules(future_skew_s))
