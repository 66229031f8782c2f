"""Plant-wide records: the forwarder that ships each station's SQLite journal to one central PostgreSQL (exactly
once, keyed ``(station_id, seq)``), the uploader of the station's archived NG images to object storage (S3 or a
directory), the central schema and its migrations, and plant-wide queries. Both background threads are
:class:`service.signals.sink.SinkThread` sinks. Needs the ``plant`` extra (psycopg 3, alembic, boto3); the station
runs without it.
"""
