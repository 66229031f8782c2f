"""One router per resource: inspect, health, model (info, swap, rollback), records."""
