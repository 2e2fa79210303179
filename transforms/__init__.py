"""Decode landed MQTT messages and normalise them into canonical readings (pure functions)."""
