"""Phone numbers: E.164 normalisation, operator detection, masking, refusal of bad values."""

import pytest

from core.phone import PhoneError, has_country_code, mask, network_code_of, normalize, operator_on_network


@pytest.mark.parametrize(
    ("raw", "region", "e164", "operator"),
    [
        ("+250788000001", "RW", "+250788000001", "MTN"),
        ("0788000001", "RW", "+250788000001", "MTN"),
        ("250733000001", "RW", "+250733000001", "AIRTEL"),
        ("0788 000 001", "RW", "+250788000001", "MTN"),
        ("00250722123456", "RW", "+250722123456", "AIRTEL"),
        ("0712345678", "KE", "+254712345678", "SAFARICOM"),
        ("254733123456", "KE", "+254733123456", "AIRTEL"),
        ("+256772123456", "RW", "+256772123456", "MTN"),
        ("0244123456", "GH", "+233244123456", "MTN"),
    ],
)
def test_normalize(raw, region, e164, operator):
    phone = normalize(raw, region)
    assert phone.e164 == e164
    assert phone.operator == operator


@pytest.mark.parametrize("raw", ["", "   ", "abc", "123", "+2507880000011111111", "0252123456", "+1"])
def test_refuses(raw):
    with pytest.raises(PhoneError):
        normalize(raw)


@pytest.mark.parametrize(("raw", "e164"), [("tel:+254712345678", "+254712345678"), ("27821234567", "+27821234567")])
def test_a_number_with_its_country_code_is_that_number_in_every_region(raw, e164):
    """A tel: link's number (pasted from a click-to-call page) and a South African number typed without its +: both
    say their country, so a super admin's search across countries reads them (admin_api.members.searched_number)
    instead of asking for the country code they carry. "27" is South Africa's two-digit code."""
    assert has_country_code(raw)
    for region in ("RW", "KE", "ZA"):
        assert normalize(raw, region).e164 == e164


def test_mask_keeps_prefix_and_last_three():
    assert mask("+250788000456") == "+25078****456"
    assert normalize("+250788000456").masked() == "+25078****456"
    assert "000456" not in repr(normalize("+250788000456"))


def test_national_forms():
    phone = normalize("+250788000001")
    assert phone.national == "0788000001"
    assert phone.national_significant == "788000001"
    assert phone.region == "RW"


@pytest.mark.parametrize("raw", ["0788OOO456", "0788ABC456", "+250 788 ONE 456", "0788-CALL-ME", "0788123456 ext 2"])
def test_letters_in_a_number_are_refused_not_read_as_a_keypad(raw):
    """phonenumbers reads letters as a phone keypad's (1-800-FLOWERS): a letter O typed for a zero in a member list
    (0788OOO456) became +250788666456, a stranger's number, registered without a word (her SMS and PIN prompts
    to him). A number is digits: letters are refused, saying so."""
    with pytest.raises(PhoneError) as refused:
        normalize(raw, "RW")
    assert "letter" in refused.value.message


@pytest.mark.parametrize("raw", ["tel:+250788123456", "Tel: 0788123456", "O788123456"])
def test_a_tel_link_or_a_word_before_the_number_is_still_read(raw):
    assert normalize(raw, "RW").e164 == "+250788123456"


@pytest.mark.parametrize(("network", "e164", "operator"), [
    ("62001", "+233201234567", "MTN"),  # a Telecel range ported to MTN Ghana
    ("mtn", "+233201234567", "MTN"),  # Hubtel's Operator
    ("MTN", "+233201234567", "MTN"),  # Nalo's NETWORK
    ("vodafone", "+233244123456", "TELECEL"),
    ("VODAFONE", "+233244123456", "TELECEL"),
    ("telecel", "+233244123456", "TELECEL"),
    ("AIRTELTIGO", "+233244123456", "AIRTELTIGO"),
    ("airtel", "+233244123456", "AIRTELTIGO"),  # Airtel Ghana is AT's now, not Airtel Money
    ("at", "+233244123456", "AIRTELTIGO"),
    ("mtn-gh", "+233201234567", "MTN"),  # named with the country, as Hubtel's channel names are
    ("Telecel Ghana", "+233244123456", "TELECEL"),
    ("vodafone-gh", "+233244123456", "TELECEL"),
    ("63510", "+250733000001", "MTN"),
    ("63513", "+250788000001", "AIRTEL"),
    ("63514", "+250788000001", "AIRTEL"),
    ("63902", "+254733123456", "SAFARICOM"),
    ("63903", "+254712345678", "AIRTEL"),
    ("64110", "+256752123456", "MTN"),
    ("64101", "+256772123456", "AIRTEL"),
    ("64122", "+256772123456", "AIRTEL"),
    ("64005", "+255754123456", "AIRTEL"),
    ("64004", "+255784123456", "VODACOM"),
    # Nothing we know for the number's country: the range decides (None).
    (None, "+233244123456", None),
    ("", "+233244123456", None),
    ("99999", "+250788000001", None),
    ("62001", "+250733000001", None),  # MTN Ghana's code for a Rwandan number
    ("63510", "+233201234567", None),
    ("mtn", "+250733000001", None),  # a name, from Ghana's aggregators only
    ("orange", "+233244123456", None),
    ("6200", "+233244123456", None),
    ("gh", "+233244123456", None),  # the country alone names no network
    ("mtn-rw", "+250733000001", None),
])
def test_operator_on_network(network, e164, operator):
    assert operator_on_network(network, e164) == operator


def test_network_code_of_a_number_on_its_ranges_operator():
    assert network_code_of("+250788000001") == "63510"
    assert network_code_of("+250733000001") == "63513"
    assert network_code_of("+233201234567") == "62002"
    assert network_code_of("+254712345678") == "63902"
    assert operator_on_network(network_code_of("+256752123456"), "+256752123456") == "AIRTEL"


@pytest.mark.parametrize(("raw", "region", "e164"), [
    ("00254712345678", "RW", "+254712345678"),  # a Kenyan number dialled the international way, in a Rwandan list
    ("00256772123456", "KE", "+256772123456"),
    ("00250788000001", "RW", "+250788000001"),
])
def test_a_number_with_00_and_its_country_code_is_that_countrys_number(raw, region, e164):
    """00 is how a phone dials abroad: 00254... is Kenya's number whichever cooperative's region reads it, not a
    local number of the region (refused as "not a valid phone number of RW")."""
    assert has_country_code(raw)
    assert normalize(raw, region).e164 == e164


def test_two_numbers_in_one_cell_are_refused_not_read_as_the_first():
    """phonenumbers reads "0788123456;0722123456" as +250788123456 (what follows ";" as a parameter): a member
    list's cell holding two numbers would register the first and drop the second without a word. Too long."""
    with pytest.raises(PhoneError) as refused:
        normalize("0788123456;0722123456", "RW")
    assert refused.value.message == "phone number is too long"


def test_a_number_too_short_to_mask_is_all_stars():
    """What is kept (country and operator prefix, last three digits) would be the whole of a value this short."""
    assert mask("") == ""
    assert mask("+25078845") == "*********"
    assert mask("+250788456") == "+25078*456"


def test_a_local_number_says_no_country_and_is_refused_naming_the_region():
    """0701234567 (a Ugandan Airtel number typed in local form into a Rwandan list) carries no country: it is read as
    the region's, and refused saying how a number of another country is written; one written with + is just
    invalid."""
    assert not has_country_code("0701234567")
    with pytest.raises(PhoneError) as local:
        normalize("0701234567", "RW")
    assert local.value.message.startswith("not a valid phone number of RW (")
    with pytest.raises(PhoneError) as international:
        normalize("+250701234567", "RW")
    assert international.value.message == "not a valid phone number"


@pytest.mark.parametrize("typed", ["078812345", "07881234567", "+2547123456", "79123456", "0701234567"])
def test_a_refusals_examples_are_shapes_never_whole_numbers(typed: str) -> None:
    """The words of a refused number reach logs (a USSD callback's malformed phoneNumber is logged with them): their
    examples are shapes (07XX XXX XXX, +256 7XX XXX XXX), never a whole number the log scan reads as a member's."""
    from tests.logscan import find_leaks

    with pytest.raises(PhoneError) as refused:
        normalize(typed, "RW")
    assert "XX" in str(refused.value) and find_leaks(str(refused.value)) == [], str(refused.value)
