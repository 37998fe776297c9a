"""PII redaction alone: card numbers by Luhn (written, grouped, spoken as ASR spells them), CVV by
its keyword, NANP and E.164 phone numbers, emails (written and spoken), SSNs; the spans name the
kind and place, never the value."""

from __future__ import annotations

import random

import pytest

from services.customer_service.redaction import (
    PiiKind,
    luhn_valid,
    nanp_valid,
    redact,
    ssn_structure_valid,
)

VISA = "4111111111111111"  # Luhn-valid test numbers of the card networks
MASTERCARD = "5500000000000004"
AMEX = "378282246310005"
DINERS_14 = "30569309025904"
VISA_13 = "4222222222222"
SPOKEN = {"0": "zero", "1": "one", "2": "two", "3": "three", "4": "four", "5": "five", "6": "six",
          "7": "seven", "8": "eight", "9": "nine"}


def spoken(digits: str) -> str:
    """Digits as speech recognition writes them, one word a digit."""
    return " ".join(SPOKEN[d] for d in digits)


def kinds(text: str, context: str = "") -> list[PiiKind]:
    return [span.kind for span in redact(text, context=context).spans]


@pytest.mark.parametrize("number", [VISA, MASTERCARD, AMEX, DINERS_14, VISA_13, "6011111111111117",
                                    "6304000000000000000"])
def test_luhn_accepts_the_networks_test_numbers(number: str) -> None:
    assert luhn_valid(number)


@pytest.mark.parametrize("number", ["4111111111111112", "5500000000000005", "1234567812345678", "", "41x1"])
def test_luhn_refuses_a_wrong_check_digit_and_non_digits(number: str) -> None:
    assert not luhn_valid(number)


@pytest.mark.parametrize("written", [VISA, "4111 1111 1111 1111", "4111-1111-1111-1111", "3782 822463 10005",
                                     "5500 0000 0000 0004", VISA_13, "6304000000000000000"])
def test_a_luhn_valid_card_number_is_redacted_however_it_is_grouped(written: str) -> None:
    result = redact(f"my card is {written} thanks")
    assert result.text == "my card is [CARD] thanks"
    [span] = result.spans
    assert (span.kind, span.start, span.end) == (PiiKind.CARD_NUMBER, 11, 11 + len(written))
    assert result.text[span.redacted_start:span.redacted_end] == "[CARD]"


@pytest.mark.parametrize("written", ["4111111111111112", "4111 1111 1111 1112", "1234-5678-1234-5678",
                                     "411111111111"])  # bad check digit; 12 digits is too short
def test_a_luhn_invalid_number_is_left_as_it_is(written: str) -> None:
    text = f"my order number is {written}"
    assert redact(text).text == text
    assert redact(text).spans == ()


def test_a_spoken_card_number_is_redacted_only_when_luhn_valid() -> None:
    assert redact(f"it is {spoken(VISA)}").text == "it is [CARD]"
    assert redact(f"it is {spoken(AMEX)} okay").text == "it is [CARD] okay"
    invalid = f"it is {spoken('4111111111111112')}"
    assert redact(invalid).text == invalid  # no 13-15 digit stretch of it is tried by chance


def test_asr_spellings_of_digits_join_one_number() -> None:
    # "oh" for zero, "double"/"triple", tens and teens, a digit homophone between digits, mixed digits
    assert redact("five five double oh triple oh oh triple oh oh triple oh four").text == "[CARD]"
    assert redact("forty one eleven eleven eleven eleven eleven eleven eleven").text == "[CARD]"
    assert redact("four one one one won one one one one one one one one one one one").text == "[CARD]"
    assert redact("4111 one one one one 1111 1111").text == "[CARD]"
    assert redact("I paid for one item").text == "I paid for one item"  # "for" alone is a word


def test_the_security_data_said_after_a_card_goes_with_it() -> None:
    result = redact(f"{spoken(VISA)} oh nine two seven one two three")  # card, expiry, CVV in one breath
    assert result.text == "[CARD] [CVV]"
    assert redact(f"{VISA} 123").text == "[CARD] [CVV]"
    assert redact(f"{VISA} {MASTERCARD}").text == "[CARD] [CARD]"


@pytest.mark.parametrize(("text", "expected"), [
    ("the cvv is 123", "the cvv is [CVV]"),
    ("security code four five six", "security code [CVV]"),
    ("my c v v is one two three four", "my c v v is [CVV]"),
    ("one two three is the cvc", "[CVV] is the cvc"),
    ("the three digits on the back are seven seven one", "the three digits on the back are [CVV]"),
])
def test_a_cvv_needs_its_keyword_nearby(text: str, expected: str) -> None:
    assert redact(text).text == expected


def test_a_cvv_keyword_in_the_utterance_before_counts() -> None:
    assert redact("one two three", context="and the security code on the back please").text == "[CVV]"
    assert redact("one two three").text == "one two three"
    assert redact("one two three", context="how many items did you order").text == "one two three"


def test_three_digits_far_from_any_keyword_stay() -> None:
    text = "the cvv thing is annoying and I have called about it maybe 123 times"
    assert redact(text).text == text


@pytest.mark.parametrize("phone", ["(415) 555-2671", "415-555-2671", "415.555.2671", "4155552671",
                                   "1 415 555 2671", "+1 415 555 2671", "+44 20 7946 0958", "+4420794609",
                                   "four one five five five five two six seven one",
                                   "plus four four two zero seven nine four six zero nine five eight",
                                   "one eight hundred five five five one two one two"])
def test_phone_numbers_nanp_and_e164_written_or_spoken(phone: str) -> None:
    result = redact(f"call me on {phone} tomorrow")
    assert result.text == "call me on [PHONE] tomorrow"
    assert result.spans[0].kind == PiiKind.PHONE


@pytest.mark.parametrize("text", ["order 0155552671 arrived", "code 4150552671", "ticket 1234567",
                                  "twenty four hours"])
def test_numbers_that_are_no_phone_number_stay(text: str) -> None:
    assert redact(text).text == text  # area code or exchange starting 0/1, too short


def test_nanp_validity() -> None:
    assert nanp_valid("4155552671")
    assert not nanp_valid("1155552671") and not nanp_valid("4150552671") and not nanp_valid("415555267")


@pytest.mark.parametrize(("text", "expected"), [
    ("mail jane.doe+cs@mail.example.org now", "mail [EMAIL] now"),
    ("my email is john dot smith at example dot com", "my email is [EMAIL]"),
    ("it's jsmith42 at gmail dot com thanks", "it's [EMAIL] thanks"),
    ("mary underscore ann at company dot co dot uk", "[EMAIL]"),
    ("john.smith at example.com", "[EMAIL]"),
])
def test_emails_written_and_spoken(text: str, expected: str) -> None:
    result = redact(text)
    assert result.text == expected
    assert result.kinds == {PiiKind.EMAIL}


@pytest.mark.parametrize("text", ["I will look at it later", "we met at the store dot", "meet at nine dot five"])
def test_at_and_dot_in_speech_are_no_email_without_a_domain(text: str) -> None:
    assert redact(text).text == text


@pytest.mark.parametrize(("text", "expected"), [
    ("ssn 123-45-6789", "ssn [SSN]"),
    ("it is 123-45-6789", "it is [SSN]"),
    ("my social security number is one two three four five six seven eight nine", "my social security number is [SSN]"),
    ("social is 987 65 4321", "social is [SSN]"),  # a 9xx area is no issued SSN, but the keyword says it is one
])
def test_ssn_by_format_or_keyword(text: str, expected: str) -> None:
    assert redact(text).text == expected


@pytest.mark.parametrize("text", ["part 000-12-3456", "part 666-12-3456", "part 123-00-4567", "id 123456789",
                                  "ref 123 45 6789"])
def test_nine_digits_without_the_ssn_format_or_keyword_stay(text: str) -> None:
    assert redact(text).text == text


def test_ssn_structure() -> None:
    assert ssn_structure_valid("123456789")
    assert not any(ssn_structure_valid(d) for d in ("000456789", "666456789", "900456789", "123006789",
                                                    "123450000", "12345678"))


def test_several_kinds_in_one_utterance_keep_their_order_and_offsets() -> None:
    text = f"card {VISA} cvv 321 phone 415 555 2671 mail a@b.io ssn 123-45-6789"
    result = redact(text)
    assert result.text == "card [CARD] cvv [CVV] phone [PHONE] mail [EMAIL] ssn [SSN]"
    assert [span.kind for span in result.spans] == [PiiKind.CARD_NUMBER, PiiKind.CVV, PiiKind.PHONE, PiiKind.EMAIL,
                                                    PiiKind.SSN]
    for span in result.spans:
        assert text[span.start:span.end].strip() == text[span.start:span.end]
        assert result.text[span.redacted_start:span.redacted_end].startswith("[")


def test_spans_carry_no_value() -> None:
    result = redact(f"card {VISA}")
    assert VISA not in repr(result.spans) and VISA not in str(result.spans[0].as_dict())
    assert result.spans[0].as_dict() == {"kind": "card_number", "start": 5, "end": 21, "redacted_start": 5,
                                         "redacted_end": 11}


@pytest.mark.parametrize("text", ["", "   ", "hello", "[CARD] and [PHONE]", "+", "plus", "- - -", "é 4111 ü"])
def test_text_without_pii_comes_back_unchanged(text: str) -> None:
    assert redact(text).text == text and redact(text).spans == ()


def test_redacting_twice_changes_nothing_more() -> None:
    once = redact(f"my card is {spoken(VISA)} and my email is john at example dot com").text
    assert redact(once).text == once


def test_a_card_number_split_by_a_pause_is_redacted_in_both_utterances() -> None:
    first = f"my card number is {spoken(VISA[:8])}"
    second = spoken(VISA[8:])
    assert redact(first).text == "my card number is [CARD]"
    assert redact(second, context=first).text == "[CARD]"
    assert redact(second).text == second  # eight digits alone, with no card nearby, are no card


def test_hesitations_and_spoken_dashes_do_not_break_a_number() -> None:
    assert redact(f"{spoken(VISA[:4])} uh {spoken(VISA[4:12])} um {spoken(VISA[12:])}").text == "[CARD]"
    assert redact("four one five dash five five five dash two six seven one").text == "[PHONE]"


def test_seven_digit_local_numbers_need_a_phone_keyword() -> None:
    assert redact("you can reach me at five five five two six seven one").text == "you can reach me at [PHONE]"
    assert redact("my cell is 555-2671").text == "my cell is [PHONE]"
    assert redact("my order is 555-2671").text == "my order is 555-2671"


def test_a_card_fragment_next_to_a_phone_keyword_is_a_phone_number() -> None:
    assert kinds("call me on my mobile it is four one five five five five two six seven one card") == [PiiKind.PHONE]
    assert kinds("the card is four one five five five five two six seven one") == [PiiKind.CARD_NUMBER]


def with_check_digit(payload: str) -> str:
    """``payload`` completed by the digit that makes it Luhn-valid."""
    return next(payload + d for d in "0123456789" if luhn_valid(payload + d))


def test_many_random_numbers_redacted_exactly_when_luhn_valid() -> None:
    rng = random.Random(18)
    for _ in range(300):
        length = rng.randint(13, 19)
        valid = with_check_digit("".join(rng.choice("0123456789") for _ in range(length - 1)))
        invalid = valid[:-1] + str((int(valid[-1]) + rng.randint(1, 9)) % 10)
        groups = " ".join(valid[i:i + 4] for i in range(0, len(valid), 4))
        for form in (valid, groups, spoken(valid)):
            assert redact(f"number {form} ok").text == "number [CARD] ok", form
        assert redact(f"number {invalid} ok").text == f"number {invalid} ok"
        # spoken, an invalid number stays too, unless its start reads as a card and the rest as its CVV
        card_then_cvv = any(len(invalid) - n >= 3 and luhn_valid(invalid[:n]) for n in (15, 16))
        assert (PiiKind.CARD_NUMBER in redact(f"number {spoken(invalid)} ok").kinds) == card_then_cvv, invalid
