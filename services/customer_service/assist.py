"""Agent assist: not built yet (issue 18).

Its responsibility: from each utterance's transcript and emotion, the events of the agent-assist
feed: the transcript with PII redacted (card numbers by Luhn, CVV, phone numbers, emails, SSN), the
emotion and a running sentiment trend, escalation when the configured policy fires (thresholds on
consecutive utterances, keywords, a negative streak, with hysteresis), and a suggested reply
retrieved from the knowledge base; and the supervisor's list of live calls.
"""
