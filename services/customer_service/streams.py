"""Call-audio stream protocols: not built yet (issue 18).

Its responsibility: one session object per connection holding the protocol's state machine for
Twilio Media Streams (``connected``, ``start``, ``media`` as base64 8 kHz μ-law, ``dtmf``, ``mark``,
``stop``; ``X-Twilio-Signature`` checked against the account's auth token) and Genesys AudioHook v2
(``open``/``opened`` negotiation, binary PCMU frames, ``ping``/``pong``, ``paused``/``resumed``,
``close``/``closed``, ``discarded``, sequence checks, the connection probe), each message validated
before it reaches the audio pipeline, each failure with its own close reason. A third protocol
(Vonage's L16 socket) is meant to be a small addition.
"""
