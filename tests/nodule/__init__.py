"""Tests of the CT nodule detection vertical (``services/nodule``)."""
