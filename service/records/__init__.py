"""Inspection records: the SQLite schema, the record stage of the request path, the store and its writer thread, the
queries, the image archive and their metrics. May import signals (the sink base), settings and core."""
