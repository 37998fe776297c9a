"""Tables of the customer-service vertical (names prefixed ``cs_``): none yet.

Issue 18 adds them, with their migration: calls (from the start of the stream; a call whose stream
died is kept partial), participants, utterances with their redacted transcript and emotion,
escalations, and the knowledge base that suggested replies are retrieved from.
"""
