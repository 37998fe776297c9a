"""Text checks every vertical applies to ids and names it is sent."""

from __future__ import annotations

import re

CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f-\x9f]")
"""A C0 or C1 control character (NUL included): never part of an id or a name a client sends."""
