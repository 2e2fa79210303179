-- Device connectivity: which devices have gone quiet, how often they drop out, and what they run.

-- Latest status each device reported; each field from the latest report that carried it.
CREATE OR REPLACE VIEW stg_device_latest_status AS
SELECT device_key,
       max(reported_at) AS last_status_at,
       arg_max(battery_pct, reported_at) FILTER (WHERE battery_pct IS NOT NULL) AS battery_pct,
       arg_max(signal_dbm, reported_at) FILTER (WHERE signal_dbm IS NOT NULL) AS signal_dbm,
       arg_max(firmware, reported_at) FILTER (WHERE firmware IS NOT NULL) AS firmware
FROM device_status
GROUP BY device_key;

-- Silences of a device (device_gaps: > 24 h without a transmission) that were open at any time in the last
-- 30 days, the current one included: a patient needs a transmitted reading on 16 days of every 30-day
-- period (99454), so a 72 h silence is worth a call before it costs the period.
CREATE OR REPLACE VIEW stg_device_gaps_30d AS
SELECT device_key,
       count(*) FILTER (WHERE hours > 24) AS gaps_over_24h_30d,
       count(*) FILTER (WHERE hours > 72) AS gaps_over_72h_30d,
       bool_or(ongoing) AS ongoing_gap
FROM device_gaps
WHERE coalesce(gap_end, now()) >= now() - INTERVAL 30 DAY
GROUP BY device_key;

-- A device is seen when it transmits a reading or reports its status (a device with a dead cuff pump still
-- reports): last seen is the later of the two.
CREATE OR REPLACE VIEW mart_device_connectivity AS
SELECT device_key, device_kind, assigned, last_reading_at, last_status_at, last_seen_at,
       date_diff('second', last_seen_at, now()) / 3600.0 AS hours_since_last_seen,
       gaps_over_24h_30d, gaps_over_72h_30d, ongoing_gap,
       battery_pct,
       -- below 20 % the patient should charge or replace batteries before the device goes silent
       battery_pct < 20 AS low_battery,
       signal_dbm, firmware
FROM (SELECT d.device_key, d.device_kind, d.person_key IS NOT NULL AS assigned,
             t.last_reading_at, s.last_status_at,
             greatest(t.last_reading_at, s.last_status_at) AS last_seen_at,
             coalesce(g.gaps_over_24h_30d, 0) AS gaps_over_24h_30d,
             coalesce(g.gaps_over_72h_30d, 0) AS gaps_over_72h_30d,
             coalesce(g.ongoing_gap, false) AS ongoing_gap,
             s.battery_pct, s.signal_dbm, s.firmware
      FROM devices d
      LEFT JOIN (SELECT device_key, max(last_at) AS last_reading_at FROM device_days GROUP BY device_key) t
             ON t.device_key = d.device_key
      LEFT JOIN stg_device_latest_status s ON s.device_key = d.device_key
      LEFT JOIN stg_device_gaps_30d g ON g.device_key = d.device_key
      -- Patient apps are registered sources too, but send events, not readings or status: not devices here.
      WHERE d.device_kind IS DISTINCT FROM 'app');

-- Firmware in the field by device kind (NULL: the device never reported its firmware).
CREATE OR REPLACE VIEW mart_firmware_spread AS
SELECT device_kind, firmware, count(*) AS devices
FROM mart_device_connectivity
GROUP BY device_kind, firmware;
