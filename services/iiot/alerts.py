"""Failure-risk alerts: not built yet (issue 19).

Its responsibility: alerts from scheduled risk scores with hysteresis and de-duplication, signed
webhook notifications through the platform's outbound webhooks, acknowledgement and resolution,
and the fog view: line risk and the asset that drives it.
"""
