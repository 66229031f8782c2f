"""Verdict signals to the line (outbox on disk, webhook, MQTT, their metrics) and the background-sink base that the
signal threads and the records writer share. May import settings and core."""
