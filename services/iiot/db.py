"""Tables of the IIoT vertical (names prefixed ``iiot_``): none yet.

Issue 19 adds them, with their migration: the asset registry (plants, lines, assets, sensors with
unit, expected range and sampling interval), readings in a layout a per-sensor time-range query
reads fast (partitioned or BRIN-indexed on PostgreSQL), quarantined rows with their reasons,
risk scores, alerts with their acknowledgement and resolution, and maintenance records.
"""
