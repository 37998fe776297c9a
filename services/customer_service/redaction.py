"""PII redaction of call transcripts, written or as speech recognition spells them out.

Kinds found and replaced by a tag (the values are never returned, logged or stored):

- ``card_number``: 13-19 digits, groups separated by spaces or dashes, redacted only when the
  Luhn checksum holds (an order number of the same length stays);
- ``cvv``: 3-4 digits near "cvv", "cvc", "security code" (in the utterance or in ``context``, the
  utterance before it: the agent asks, the caller answers), and the 3-8 digits said right after a
  card number in one breath (its CVV, or expiry and CVV);
- ``phone``: NANP numbers (10 digits, or 11 with the leading 1; area code and exchange 2-9) and
  E.164 (``+`` or "plus", then 8-15 digits);
- ``email``: ``name@domain.tld`` and the spoken "john dot smith at example dot com" (spoken only
  with a common top-level domain, to keep "look at that dot" out);
- ``ssn``: US social security numbers, ``###-##-####`` with a valid area/group/serial, or any 9
  digits near "social security"/"SSN".

Speech is cut into utterances at pauses, so a number may be split between two: 6-12 digits near
"card" (or "visa", "credit", ...) are redacted as ``card_number`` and 7 digits near "phone" (or
"call me", "mobile", ...) as ``phone``, and a keyword anywhere in ``context`` counts for digits
that open the utterance. The first half of a split card number is redacted only when a card
keyword stands near it; a pipeline that must be sure holds an utterance ending in digits back
until the next one arrives.

Digits may be written ("4111 1111"), spoken as ASR writes them ("four one one one", "oh",
"double five", "forty one eleven", "eight hundred") or mixed. A run of digits is the maximal
sequence of such tokens separated only by spaces, ``-``, ``.``, ``/``, parentheses, the word
"dash" or a hesitation ("uh"); homophones ("for", "to", "too") count as digits only between two
digit tokens. Cards are searched first: the whole run, or in a longer run its first 16 or 15
digits when 3-8 follow (card, then CVV or expiry); what remains of each run is then checked whole
as an SSN, phone number, CVV or card fragment. A stretch inside a run is never tried otherwise:
among the many windows of a long spoken number one in ten passes Luhn by chance.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum


class PiiKind(StrEnum):
    """What a redacted span was."""

    CARD_NUMBER = "card_number"
    CVV = "cvv"
    PHONE = "phone"
    EMAIL = "email"
    SSN = "ssn"


REDACTION_TAGS: dict[PiiKind, str] = {
    PiiKind.CARD_NUMBER: "[CARD]",
    PiiKind.CVV: "[CVV]",
    PiiKind.PHONE: "[PHONE]",
    PiiKind.EMAIL: "[EMAIL]",
    PiiKind.SSN: "[SSN]",
}
"""The text that replaces each kind in a redacted transcript."""


@dataclass(frozen=True, slots=True)
class RedactedSpan:
    """One redaction: its kind and where it was (``start``/``end`` in the original text,
    ``redacted_start``/``redacted_end`` where its tag stands in the redacted text)."""

    kind: PiiKind
    start: int
    end: int
    redacted_start: int
    redacted_end: int

    def as_dict(self) -> dict[str, object]:
        """JSON-ready form (what the utterance row and the assist feed carry)."""
        return {"kind": self.kind.value, "start": self.start, "end": self.end,
                "redacted_start": self.redacted_start, "redacted_end": self.redacted_end}


@dataclass(frozen=True, slots=True)
class Redaction:
    """A transcript with its PII replaced, and what was replaced where."""

    text: str
    spans: tuple[RedactedSpan, ...]

    @property
    def kinds(self) -> set[PiiKind]:
        """The kinds of PII found."""
        return {span.kind for span in self.spans}


CARD_DIGITS = range(13, 20)
CARD_PREFIX_DIGITS = (16, 15)
CARD_TRAILER_DIGITS = range(3, 9)
"""A card is looked for at the start of a longer run only when its CVV, or expiry and CVV, could follow
(3-8 digits); those digits, said in the same breath as the card, are redacted as ``cvv``."""
CVV_DIGITS = range(3, 5)
E164_DIGITS = range(8, 16)
KEYWORD_WINDOW_BEFORE = 8
"""A CVV/SSN keyword counts when it is among this many words before the digits..."""
KEYWORD_WINDOW_AFTER = 4
"""...or this many after them."""

UNITS = {"zero": "0", "oh": "0", "o": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
         "six": "6", "seven": "7", "eight": "8", "nine": "9"}
TEENS = {"ten": "10", "eleven": "11", "twelve": "12", "thirteen": "13", "fourteen": "14", "fifteen": "15",
         "sixteen": "16", "seventeen": "17", "eighteen": "18", "nineteen": "19"}
TENS = {"twenty": "2", "thirty": "3", "forty": "4", "fifty": "5", "sixty": "6", "seventy": "7", "eighty": "8",
        "ninety": "9"}
REPEATS = {"double": 2, "triple": 3}
MULTIPLIERS = {"hundred": "00", "thousand": "000"}
HOMOPHONES = {"for": "4", "to": "2", "too": "2", "won": "1", "ate": "8"}
"""ASR's spelling of a digit that is also a common word: a digit only between two digits."""
SEPARATOR_WORDS = {"dash", "hyphen", "uh", "um", "er", "erm", "ah", "hmm"}
"""Words that may stand between two digits of one number (a spoken dash, a hesitation)."""
PLUS_WORDS = {"plus"}

CVV_CONTEXT = re.compile(r"\b(cvv2?|cvc2?|csc|c v [vc]|security (code|number)|verification (code|number)|"
                         r"card code|(three|3|four|4) digits? (code )?on the back)\b")
SSN_CONTEXT = re.compile(r"\b(social security|social|ssn|s s n)\b")
PHONE_CONTEXT = re.compile(r"\b(phone|cell|mobile|telephone|call me|reach me|call back|callback|text me)\b")
CARD_CONTEXT = re.compile(r"\b(card|visa|master ?card|amex|american express|discover|credit|debit)\b")
LOCAL_PHONE_DIGITS = 7
CARD_FRAGMENT_DIGITS = range(6, 13)
"""Digits near a card keyword that are part of a card number split by a pause (the utterance
before or after holds the rest): redacted as ``card_number`` though no checksum can be run."""

TOKEN = re.compile(r"[A-Za-z0-9']+|\+")
SEPARATOR_GAP = re.compile(r"[ \t\-./()]{0,4}")

WRITTEN_EMAIL = re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,24}\b")
SPOKEN_TLDS = ("com|net|org|edu|gov|io|co|us|uk|ca|de|fr|info|biz|me|ai|app|dev|mail|au|nz|ie|in")
_WORD = r"[A-Za-z0-9][A-Za-z0-9_\-]*"
_LOCAL = rf"{_WORD}(?:(?:\.|\s+(?:dot|underscore|dash|hyphen|plus)\s+){_WORD})*"
_DOMAIN = rf"{_WORD}(?:(?:\.|\s+dot\s+){_WORD})*(?:\.|\s+dot\s+)(?:{SPOKEN_TLDS})"
SPOKEN_EMAIL = re.compile(rf"\b{_LOCAL}\s+at\s+{_DOMAIN}\b", re.IGNORECASE)


def luhn_valid(digits: str) -> bool:
    """True when ``digits`` (only 0-9) passes the Luhn checksum (ISO/IEC 7812-1)."""
    if not digits or not digits.isdigit():
        return False
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2 == 1:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def ssn_structure_valid(digits: str) -> bool:
    """True for 9 digits that could be an issued SSN (area not 000, 666 or 9xx; group and serial not zero)."""
    if len(digits) != 9 or not digits.isdigit():
        return False
    area, group, serial = digits[:3], digits[3:5], digits[5:]
    return area not in {"000", "666"} and not area.startswith("9") and group != "00" and serial != "0000"


def nanp_valid(digits: str) -> bool:
    """True for a 10-digit North American number (area code and exchange start with 2-9)."""
    return len(digits) == 10 and digits.isdigit() and digits[0] >= "2" and digits[3] >= "2"


@dataclass(frozen=True, slots=True)
class _Token:
    text: str
    start: int
    end: int

    @property
    def lower(self) -> str:
        return self.text.lower()


@dataclass(frozen=True, slots=True)
class _DigitToken:
    """A token (or two, "forty one") that stands for digits; ``index`` of its first word token."""

    digits: str
    start: int
    end: int
    index: int
    last_index: int
    shape: str
    """How it was written: the digits as typed ("123"), or "spoken"."""


@dataclass(slots=True)
class _Run:
    """A maximal sequence of digit tokens (see the module docstring)."""

    tokens: list[_DigitToken]
    plus_start: int | None
    """Where the "+" or "plus" right before the run starts (None: there is none)."""
    gaps: list[str]
    """The text between consecutive tokens (``gaps[i]`` is before ``tokens[i + 1]``)."""


def redact(text: str, *, context: str = "") -> Redaction:
    """``text`` with every card number, CVV, phone number, email and SSN replaced by its tag.

    ``context`` is what was said just before (the previous utterance of the call, either speaker):
    its keywords count for digits near the start of ``text``, so "one two three" after "what is the
    security code" is a CVV. It is never redacted or returned itself.
    """
    found: list[tuple[int, int, PiiKind]] = [(m.start(), m.end(), PiiKind.EMAIL) for m in _emails(text)]
    tokens = [_Token(m.group(), m.start(), m.end()) for m in TOKEN.finditer(text)]
    words = [token.lower for token in tokens]
    context_words = [m.group().lower() for m in TOKEN.finditer(context)]
    for run in _digit_runs(text, tokens, found):
        found.extend(_classify_run(text, run, words, context_words))
    return _apply(text, found)


def _emails(text: str) -> Iterator[re.Match[str]]:
    written = list(WRITTEN_EMAIL.finditer(text))
    yield from written
    for match in SPOKEN_EMAIL.finditer(text):
        if not any(w.start() < match.end() and match.start() < w.end() for w in written):
            yield match


def _digit_runs(text: str, tokens: Sequence[_Token], taken: Sequence[tuple[int, int, PiiKind]]) -> Iterator[_Run]:
    digit_tokens = _digit_tokens(tokens, taken)
    run: _Run | None = None
    for token in digit_tokens:
        if run is not None:
            previous = run.tokens[-1]
            gap = text[previous.end:token.start]
            if token.index == previous.last_index + 1 and SEPARATOR_GAP.fullmatch(gap):
                run.tokens.append(token)
                run.gaps.append(gap)
                continue
            if token.index == previous.last_index + 2 and tokens[previous.last_index + 1].lower in SEPARATOR_WORDS:
                run.tokens.append(token)
                run.gaps.append(gap)
                continue
            yield run
        run = _Run([token], _plus_before(tokens, token.index), [])
    if run is not None:
        yield run


def _plus_before(tokens: Sequence[_Token], index: int) -> int | None:
    if index == 0:
        return None
    previous = tokens[index - 1]
    return previous.start if previous.text == "+" or previous.lower in PLUS_WORDS else None


def _digit_tokens(tokens: Sequence[_Token], taken: Sequence[tuple[int, int, PiiKind]]) -> list[_DigitToken]:
    """Every token that stands for digits, in order (a tens word absorbs the unit after it)."""
    result: list[_DigitToken] = []
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if any(start < token.end and token.start < end for start, end, _ in taken):
            index += 1
            continue
        parsed = _parse_digits(tokens, index)
        if parsed is not None:
            result.append(parsed)
            index = parsed.last_index + 1
            continue
        if token.lower in HOMOPHONES and result and result[-1].last_index == index - 1 \
                and index + 1 < len(tokens) and _parse_digits(tokens, index + 1) is not None:
            result.append(_DigitToken(HOMOPHONES[token.lower], token.start, token.end, index, index, "spoken"))
        index += 1
    return result


def _parse_digits(tokens: Sequence[_Token], index: int) -> _DigitToken | None:
    token = tokens[index]
    word = token.lower
    nxt = tokens[index + 1].lower if index + 1 < len(tokens) else ""
    if token.text.isdigit():
        return _DigitToken(token.text, token.start, token.end, index, index, token.text)
    if word in TENS:
        if nxt in UNITS and nxt not in {"zero", "oh", "o"}:
            return _spoken(tokens, index, index + 1, TENS[word] + UNITS[nxt])
        return _spoken(tokens, index, index, TENS[word] + "0")
    if word in TEENS:
        return _spoken(tokens, index, index, TEENS[word])
    if word in REPEATS and nxt in UNITS:
        return _spoken(tokens, index, index + 1, UNITS[nxt] * REPEATS[word])
    if word in UNITS:
        if nxt in MULTIPLIERS and word not in {"zero", "oh", "o"}:
            return _spoken(tokens, index, index + 1, UNITS[word] + MULTIPLIERS[nxt])
        return _spoken(tokens, index, index, UNITS[word])
    return None


def _spoken(tokens: Sequence[_Token], first: int, last: int, digits: str) -> _DigitToken:
    return _DigitToken(digits, tokens[first].start, tokens[last].end, first, last, "spoken")


def _classify_run(text: str, run: _Run, words: Sequence[str],
                  context_words: Sequence[str]) -> list[tuple[int, int, PiiKind]]:
    found: list[tuple[int, int, PiiKind]] = []
    segments: list[tuple[int, int, bool]] = []  # what is left around the cards: (first, last, right after one)
    segment_start, after_card = 0, False
    for first, last in _card_windows(run.tokens):
        found.append((run.tokens[first].start, run.tokens[last].end, PiiKind.CARD_NUMBER))
        if first > segment_start:
            segments.append((segment_start, first - 1, after_card))
        segment_start, after_card = last + 1, True
    if segment_start < len(run.tokens):
        segments.append((segment_start, len(run.tokens) - 1, after_card))
    for first, last, follows_card in segments:
        kind = _segment_kind(run, first, last, words, context_words, follows_card)
        if kind is PiiKind.PHONE:
            found.append((_phone_start(text, run, first), run.tokens[last].end, kind))
        elif kind is not None:
            found.append((run.tokens[first].start, run.tokens[last].end, kind))
    return found


def _card_windows(tokens: Sequence[_DigitToken]) -> Iterator[tuple[int, int]]:
    """Token ranges (first, last) holding a Luhn-valid card number.

    A whole run of 13-19 digits is one; in a longer run (a card said with its expiry and CVV), its
    first 16 or 15 digits (the common lengths) when at least 3 digits follow them, then the rest
    likewise. Shorter stretches of a run are not tried: among the many windows of a long spoken
    number one in ten passes Luhn by chance, and an invalid number must stay as it is.
    """
    first = 0
    while first < len(tokens):
        digits = "".join(token.digits for token in tokens[first:])
        if len(digits) in CARD_DIGITS and luhn_valid(digits):
            yield first, len(tokens) - 1
            return
        last = _card_prefix(tokens, first, len(digits))
        if last is None:
            return
        yield first, last
        first = last + 1


def _card_prefix(tokens: Sequence[_DigitToken], first: int, total: int) -> int | None:
    """The last token of a Luhn-valid 16- or 15-digit prefix of ``tokens[first:]`` followed by 3+ digits."""
    for length in CARD_PREFIX_DIGITS:
        if total - length < CARD_TRAILER_DIGITS.start:
            continue
        digits = ""
        for last in range(first, len(tokens)):
            digits += tokens[last].digits
            if len(digits) >= length:
                break
        if len(digits) == length and luhn_valid(digits):
            return last
    return None


def _segment_kind(run: _Run, first: int, last: int, words: Sequence[str], context_words: Sequence[str],
                  follows_card: bool) -> PiiKind | None:
    tokens = run.tokens[first:last + 1]
    digits = "".join(token.digits for token in tokens)
    if follows_card and len(digits) in CARD_TRAILER_DIGITS:
        return PiiKind.CVV
    near = _words_near(words, context_words, tokens[0].index, tokens[-1].last_index)
    if len(digits) == 9 and (SSN_CONTEXT.search(near) or (_written_ssn(run, first, last)
                                                          and ssn_structure_valid(digits))):
        return PiiKind.SSN
    if first == 0 and run.plus_start is not None and len(digits) in E164_DIGITS and digits[0] != "0":
        return PiiKind.PHONE
    phone_context, card_context = PHONE_CONTEXT.search(near), CARD_CONTEXT.search(near)
    if len(digits) in CARD_FRAGMENT_DIGITS and card_context and not phone_context:
        return PiiKind.CARD_NUMBER
    if nanp_valid(digits) or (len(digits) == 11 and digits[0] == "1" and nanp_valid(digits[1:])):
        return PiiKind.PHONE
    if len(digits) == LOCAL_PHONE_DIGITS and digits[0] >= "2" and phone_context:
        return PiiKind.PHONE
    if len(digits) in CVV_DIGITS and CVV_CONTEXT.search(near):
        return PiiKind.CVV
    return None


def _phone_start(text: str, run: _Run, first: int) -> int:
    """A phone number's redaction includes its "+"/"plus" and an opening parenthesis."""
    start = run.plus_start if first == 0 and run.plus_start is not None else run.tokens[first].start
    return start - 1 if start > 0 and text[start - 1] == "(" else start


def _written_ssn(run: _Run, first: int, last: int) -> bool:
    """``###-##-####`` as typed: three tokens of 3, 2 and 4 digits joined by dashes."""
    if last - first != 2:
        return False
    shapes = [len(token.shape) if token.shape != "spoken" else 0 for token in run.tokens[first:last + 1]]
    return shapes == [3, 2, 4] and all(gap.strip() == "-" for gap in run.gaps[first:last])


def _words_near(words: Sequence[str], context_words: Sequence[str], first: int, last: int) -> str:
    """The words around a segment where a keyword counts: the whole ``context`` too when the segment
    opens the utterance (within the window)."""
    before = [*context_words, *words[:first]] if first < KEYWORD_WINDOW_BEFORE else \
        words[first - KEYWORD_WINDOW_BEFORE:first]
    after = list(words[last + 1:last + 1 + KEYWORD_WINDOW_AFTER])
    return " ".join([*before, "|", *after])


def _apply(text: str, found: Sequence[tuple[int, int, PiiKind]]) -> Redaction:
    pieces: list[str] = []
    spans: list[RedactedSpan] = []
    cursor = 0
    length = 0
    for start, end, kind in sorted(found):
        if start < cursor:  # overlaps one already replaced (cannot happen by construction; keep the first)
            continue
        pieces.append(text[cursor:start])
        length += start - cursor
        tag = REDACTION_TAGS[kind]
        spans.append(RedactedSpan(kind, start, end, length, length + len(tag)))
        pieces.append(tag)
        length += len(tag)
        cursor = end
    pieces.append(text[cursor:])
    return Redaction("".join(pieces), tuple(spans))
