"""GSM-7 / UCS-2 detection, lengths and segment counts at every boundary."""

import pytest

from channels.sms.encoding import GSM7, UCS2, is_gsm7, measure


@pytest.mark.parametrize(
    ("text", "encoding", "length", "segments"),
    [
        ("", GSM7, 0, 0),
        ("a" * 160, GSM7, 160, 1),
        ("a" * 161, GSM7, 161, 2),
        ("a" * 306, GSM7, 306, 2),
        ("a" * 307, GSM7, 307, 3),
        ("€" * 80, GSM7, 160, 1),  # extension table: two septets each
        ("€" * 81, GSM7, 162, 2),
        ("Réf: é è à ù ì ò Ç ß Ñ", GSM7, 22, 1),
        ("ç" * 70, UCS2, 70, 1),  # lower-case ç is not in GSM 03.38
        ("ç" * 71, UCS2, 71, 2),
        ("ê" * 134, UCS2, 134, 2),
        ("ê" * 135, UCS2, 135, 3),
        ("😀" * 35, UCS2, 70, 1),  # surrogate pairs count two
    ],
)
def test_measure(text: str, encoding: str, length: int, segments: int) -> None:
    size = measure(text)
    assert (size.encoding, size.length, size.segments) == (encoding, length, segments)


def test_escape_pair_is_not_split_across_parts() -> None:
    # 152 septets then a 2-septet '€': it does not fit in part one's 153, so it moves to part two.
    text = "a" * 152 + "€" + "a" * 10
    assert measure(text).length == 164
    assert measure(text).segments == 2
    assert measure("a" * 152 + "€" + "a" * 152).segments == 3


def test_is_gsm7() -> None:
    assert is_gsm7("Hello {world} [1] ~ ^ | \\ €")
    assert not is_gsm7("Muraho ✓")


def test_surrogate_pair_is_not_split_across_parts() -> None:
    # 67 emoji are 134 UTF-16 units, two parts' 2 x 67 exactly, but a pair never straddles a part: 33 fit in each
    # (66 units), so the 67th takes a third part, as the handset and the SMSC bill it.
    assert (measure("😀" * 67).length, measure("😀" * 67).segments) == (134, 3)
    assert measure("ê" + "😀" * 33 + "ê" * 67).segments == 2  # 67 units exactly in part one, pair not split
