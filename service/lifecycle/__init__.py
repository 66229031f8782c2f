"""A service instance from start to stop: the station (records, signals, model, pipeline opened and closed in order),
warm-up, live swap and rollback, memory hand-back and GC freeze, and their metrics. May import inference and below."""
