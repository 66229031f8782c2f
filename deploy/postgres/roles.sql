-- Least-privilege roles of the plant's central database (docs/deploy.md, "Plant records: central PostgreSQL").
-- Run with psql as the owner of the central tables (the superuser `postgres` of the compose stack), after the central
-- migration and again after every later one (new tables need their grants); re-running also sets new passwords:
--   docker compose exec -T postgres psql -U postgres -d aoi_central -v ON_ERROR_STOP=1 \
--     -v station_password="$STATION_PW" -v grafana_password="$GRAFANA_PW" < deploy/postgres/roles.sql
--
-- aoi_station, every station's forwarder: check the schema version, read its own watermark, stage a batch in
--   temporary tables (CREATE TEMP TABLE ... LIKE needs SELECT on the source) and insert it; its NG image upload
--   settles its images rows (pending -> stored or missing: those four columns only). No other UPDATE, no DELETE,
--   TRUNCATE or DDL: a station can neither rewrite nor erase the plant's records, nor migrate the schema.
-- aoi_grafana, the Plant dashboard: SELECT only, read-only transactions, bounded statements.
-- tests/deploy/test_plant_database.py runs this file and the real forwarder and dashboard queries as these roles.

\set ON_ERROR_STOP on

SELECT 'CREATE ROLE aoi_station' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'aoi_station') \gexec
SELECT 'CREATE ROLE aoi_grafana' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'aoi_grafana') \gexec
ALTER ROLE aoi_station LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'station_password';
ALTER ROLE aoi_grafana LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'grafana_password';

-- Only these roles (and the owner) connect; only the stations create temporary (staging) tables.
REVOKE ALL ON DATABASE :"DBNAME" FROM PUBLIC;
GRANT CONNECT, TEMPORARY ON DATABASE :"DBNAME" TO aoi_station;
GRANT CONNECT ON DATABASE :"DBNAME" TO aoi_grafana;

-- PostgreSQL 15 already keeps CREATE on the public schema from PUBLIC; stated for older servers.
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO aoi_station, aoi_grafana;

GRANT SELECT ON alembic_version TO aoi_station;
GRANT INSERT, SELECT ON inspections, detections, images, reviews TO aoi_station;
GRANT UPDATE (state, object_key, bytes, stored_at) ON images TO aoi_station;
GRANT SELECT ON inspections, detections, images, reviews TO aoi_grafana;

ALTER ROLE aoi_grafana SET default_transaction_read_only = on;
ALTER ROLE aoi_grafana SET statement_timeout = '60s';
