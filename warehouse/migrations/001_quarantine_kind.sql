-- Which kind of item a quarantined row is: 'reading' (vitals), 'status' (device status), 'event' (app event)
-- or 'message' (a whole message that could not be read). A replay rebuilds an item with the normaliser of its
-- kind; rows quarantined before this column existed keep NULL, and pipeline/replay.py tells their kind from
-- the id they carry (only the normaliser that made an item reproduces its id).
ALTER TABLE quarantine ADD COLUMN kind VARCHAR;

UPDATE quarantine SET kind = 'message'
WHERE kind IS NULL AND reading_id IS NULL AND len(reasons) = 1
  AND reasons[1] IN ('not_utf8', 'not_json', 'not_a_json_object', 'unknown_topic', 'payload_too_large',
                     'empty_batch', 'batch_too_large', 'readings_not_a_list', 'statuses_not_a_list',
                     'events_not_a_list', 'reading_not_an_object', 'event_not_an_object');
