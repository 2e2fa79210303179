-- Device connectivity: which devices have gone quiet, how often they drop out, and what they run.
-- Days, not instants: the store keeps device status and silences per UTC day, readings per patient-local day.

-- Latest status each device reported; each field from the latest day that carried it.
CREATE OR REPLACE VIEW stg_device_latest_status AS
SELECT device_key,
       max(day) AS last_status_on,
       arg_max(battery_pct, day) FILTER (WHERE battery_pct IS NOT NULL) AS battery_pct,
       arg_max(signal_dbm, day) FILTER (WHERE signal_dbm IS NOT NULL) AS signal_dbm,
       arg_max(firmware, day) FILTER (WHERE firmware IS NOT NULL) AS firmware
FROM device_status
GROUP BY device_key;

-- Silences of a device (device_gaps: > 24 h without a transmission) that were open on any of the last 30 days,
-- the current one included: a patient needs a transmitted reading on 16 days of every 30-day period (99454),
-- so a 72 h silence is worth a call before it costs the period.
CREATE OR REPLACE VIEW stg_device_gaps_30d AS
SELECT device_key,
       count(*) AS gaps_over_24h_30d,
       count(*) FILTER (WHERE hours > 72) AS gaps_over_72h_30d,
       bool_or(ongoing) AS ongoing_gap
FROM device_gaps
WHERE coalesce(gap_end_on, CAST(now() AT TIME ZONE 'UTC' AS DATE)) > CAST(now() AT TIME ZONE 'UTC' AS DATE) - 30
GROUP BY device_key;

-- A device is seen when it transmits a reading or reports its status (a device with a dead cuff pump still
-- reports): last seen is the later of the two; days since then counted to today (UTC).
CREATE OR REPLACE VIEW mart_device_connectivity AS
SELECT device_key, device_kind, assigned, last_reading_on, last_status_on, last_seen_on,
       CAST(now() AT TIME ZONE 'UTC' AS DATE) - last_seen_on AS days_since_last_seen,
       gaps_over_24h_30d, gaps_over_72h_30d, ongoing_gap,
       battery_pct,
       -- below 20 % the patient should charge or replace batteries before the device goes silent
       battery_pct < 20 AS low_battery,
       signal_dbm, firmware
FROM (SELECT d.device_key, d.device_kind, d.person_key IS NOT NULL AS assigned,
             t.last_reading_on, s.last_status_on,
             greatest(t.last_reading_on, s.last_status_on) AS last_seen_on,
             coalesce(g.gaps_over_24h_30d, 0) AS gaps_over_24h_30d,
             coalesce(g.gaps_over_72h_30d, 0) AS gaps_over_72h_30d,
             coalesce(g.ongoing_gap, false) AS ongoing_gap,
             s.battery_pct, s.signal_dbm, s.firmware
      FROM devices d
      LEFT JOIN (SELECT device_key, max(day) AS last_reading_on FROM device_days GROUP BY device_key) t
             ON t.device_key = d.device_key
      LEFT JOIN stg_device_latest_status s ON s.device_key = d.device_key
      LEFT JOIN stg_device_gaps_30d g ON g.device_key = d.device_key
      -- Patient apps are registered sources too, but send events, not readings or status: not devices here.
      WHERE d.device_kind IS DISTINCT FROM 'app');

-- The published form of connectivity: no row per device, devices counted by kind and how long ago they were
-- last seen; 'all' is the kind's total (published reports suppress around it).
CREATE OR REPLACE VIEW mart_connectivity_by_kind AS
SELECT device_kind, CASE WHEN grouping(last_seen) = 1 THEN 'all' ELSE last_seen END AS last_seen,
       count(*) AS devices,
       count(*) FILTER (WHERE low_battery) AS devices_low_battery,
       count(*) FILTER (WHERE ongoing_gap) AS devices_silent_now
FROM (SELECT device_kind, low_battery, ongoing_gap,
             CASE WHEN days_since_last_seen IS NULL THEN 'never'
                  WHEN days_since_last_seen <= 0 THEN 'today'
                  WHEN days_since_last_seen <= 2 THEN '1-2 days'
                  WHEN days_since_last_seen <= 7 THEN '3-7 days'
                  WHEN days_since_last_seen <= 30 THEN '8-30 days'
                  ELSE 'over 30 days' END AS last_seen
      FROM mart_device_connectivity)
GROUP BY GROUPING SETS ((device_kind, last_seen), (device_kind));

-- Firmware in the field by device kind (NULL: the device never reported its firmware; 'other': a value that
-- is not a version released for the kind, transforms/catalogue.py); 'all' is the kind's total.
CREATE OR REPLACE VIEW mart_firmware_spread AS
SELECT device_kind, CASE WHEN grouping(firmware) = 1 THEN 'all' ELSE firmware END AS firmware,
       count(*) AS devices
FROM mart_device_connectivity
GROUP BY GROUPING SETS ((device_kind, firmware), (device_kind));
