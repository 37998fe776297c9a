"""Tests of the IIoT failure-prediction vertical (``services/iiot``)."""
