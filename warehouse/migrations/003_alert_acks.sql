-- Acknowledgements made before alert_acks existed: the one each alert still shows becomes its first row (earlier
-- ones were overwritten by it; the audit log names who acknowledged, and when).
INSERT INTO alert_acks (alert_id, clinician_id, acknowledged_at, note, rule, resolved)
SELECT alert_id, acknowledged_by, acknowledged_at, ack_note, rule,
       coalesce(resolved_at <= acknowledged_at, false)
FROM alerts
WHERE acknowledged_by IS NOT NULL AND acknowledged_at IS NOT NULL;
