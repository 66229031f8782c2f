"""One router per resource: inspect, health, model (info, swap, rollback), records, plant, station, and v2 (the Open
Inference Protocol's metadata, readiness and infer routes over the same pipeline as inspect)."""
