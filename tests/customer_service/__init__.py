"""Tests of the emotion-aware customer-service vertical (``services/customer_service``)."""
