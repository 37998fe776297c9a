"""Ingestion and validation of sensor readings: not built yet (issue 19).

Its responsibility: read CSV, Parquet or JSON Lines files of any size (long and wide formats),
JSON batches and MQTT payloads through one validation path (schema, units and their conversion,
ranges, timestamps and time zones, duplicates, out-of-order rows, gaps), quarantine bad rows with
reasons, keep good rows with bulk writes (COPY on PostgreSQL, executemany on SQLite), and make
re-ingesting the same file idempotent.
"""
