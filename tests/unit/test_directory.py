"""The specialist directory: YAML and CSV entries, the NPI check, duplicate ids, lookups."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.outbound.directory import (
    Directory,
    OutboundError,
    load_directory,
    npi_valid,
    read_directory,
)
from engine.outbound.model import Party, Target

NETWORK = Path(__file__).resolve().parents[1] / "data" / "outbound" / "network" / "directory"
FORMATS = frozenset({"hl7v2.ref_i12", "document.pdf", "document.html", "fhir.referral_bundle"})
CHANNELS = frozenset({"specialist", "email", "fhir-specialist"})
HEADER = (
    "id,name,npi,specialties,accepted_plans,locations,channel,format,endpoint,"
    "receiving_application,receiving_facility,active\n"
)
ONE = """\
schema: referral-directory/v1
specialists:
  - id: heartwell
    name: Heartwell (FAKE)
    npi: "1234567893"
    specialties: [cardiology]
    targets:
      - {channel: specialist, format: hl7v2.ref_i12}
"""


def errors_of(tmp_path: Path, files: dict[str, str], **known: frozenset[str]) -> list[str]:
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    _, errors = read_directory(tmp_path, **known)  # type: ignore[arg-type]
    return [e.replace(f"{tmp_path}/", "") for e in errors]


@pytest.mark.parametrize(
    ("npi", "valid"),
    [
        ("1234567893", True),  # the CMS example
        ("1000000004", True),
        ("1555555550", True),
        ("1234567890", False),  # wrong check digit
        ("1234567839", False),  # two digits swapped
        ("123456789", False),  # nine digits
        ("12345678931", False),
        ("12345678a3", False),
        ("".join(chr(0xFF10 + int(c)) for c in "1234567893"), False),  # full-width digits
        ("", False),
    ],
)
def test_npi_check_digit(npi: str, valid: bool) -> None:
    assert npi_valid(npi) is valid


def test_yaml_and_csv_entries_in_file_order() -> None:
    directory = load_directory(NETWORK, known_formats=FORMATS)
    assert [s.id for s in directory] == ["heartwell", "valley-heart", "skinworks", "closed-cardio"]
    heartwell = directory.get("heartwell")
    assert heartwell is not None
    assert heartwell.npi == "1234567893"
    assert heartwell.provider_names == ("Example, Ada", "Sample, Ben")
    assert heartwell.accepted_plans == ("PLAN-A",)
    assert heartwell.locations == ("North",)
    assert heartwell.receiver == Party("HEARTWELL", "CARDIO")
    assert heartwell.targets == (
        Target("specialist", "hl7v2.ref_i12", "127.0.0.1:12576"),
        Target("email", "document.pdf", "intake@heartwell.example"),
    )
    valley = directory.get("valley-heart")
    assert valley is not None
    assert valley.receiver == Party("", "")
    assert valley.specialties == ("cardiology", "electrophysiology")


def test_csv_rows_repeating_an_id_add_targets() -> None:
    skin = load_directory(NETWORK).get("skinworks")
    assert skin is not None
    assert skin.name == "Skinworks Dermatology (FAKE)"
    assert skin.specialties == ("dermatology", "mohs")
    assert skin.accepted_plans == ("PLAN-A", "PLAN-B")
    assert skin.receiver == Party("SKIN", "DERM")
    assert skin.targets == (
        Target("specialist", "hl7v2.ref_i12", "127.0.0.1:12577"),
        Target("email", "document.html", "skin@skinworks.example"),
    )
    closed = load_directory(NETWORK).get("closed-cardio")
    assert closed is not None
    assert closed.active is False


def test_lookups_skip_inactive_entries() -> None:
    directory = load_directory(NETWORK)
    assert directory.find("1000000004") is directory.get("valley-heart")  # by NPI
    assert directory.find("skinworks") is directory.get("skinworks")  # by directory id
    assert directory.find("1666666668") is None  # closed-cardio's NPI: inactive
    assert directory.find("closed-cardio") is None
    assert directory.get("closed-cardio") is not None  # get() still sees it
    assert directory.find("9999999999") is None
    for_cardio = directory.for_specialty("cardiology")
    assert for_cardio is not None
    assert for_cardio.id == "heartwell"
    elphys = directory.for_specialty("electrophysiology")
    assert elphys is not None
    assert elphys.id == "valley-heart"
    assert directory.for_specialty("neurology") is None


@pytest.mark.parametrize(
    ("identifier", "specialty", "expected"),
    [
        ("1000000004", "cardiology", "valley-heart"),  # the named recipient beats specialty
        ("skinworks", "cardiology", "skinworks"),
        ("1666666668", "cardiology", "heartwell"),  # named but inactive: by specialty
        ("0000000000", "dermatology", "skinworks"),  # unknown: by specialty
        (None, "mohs", "skinworks"),
        (None, "neurology", None),
        (None, None, None),
    ],
)
def test_select(identifier: str | None, specialty: str | None, expected: str | None) -> None:
    found = load_directory(NETWORK).select(identifier, specialty)
    assert (found.id if found else None) == expected


def test_channels_and_formats_of_active_entries_only() -> None:
    directory = load_directory(NETWORK)
    assert directory.channels() == {"specialist", "email", "fhir-specialist"}  # not "nowhere"
    assert "document.html" in directory.formats()


def test_missing_folder_is_an_empty_directory(tmp_path: Path) -> None:
    directory = load_directory(tmp_path / "nope")
    assert len(directory) == 0
    assert directory == Directory()
    assert directory.select("1234567893", "cardiology") is None


def test_the_same_npi_twice_resolves_to_the_first(tmp_path: Path) -> None:
    second = ONE.split("specialists:\n", 1)[1].replace("heartwell", "heartwell-south")
    (tmp_path / "d.yaml").write_text(ONE + second, encoding="utf-8")
    found = load_directory(tmp_path).find("1234567893")
    assert found is not None
    assert found.id == "heartwell"


BAD = [
    pytest.param(
        {"d.yaml": ONE.replace('"1234567893"', '"1234567890"')},
        "d.yaml:5:10: an NPI is 10 digits, the last the Luhn check digit of 80840",
        id="wrong-npi-yaml",
    ),
    pytest.param(
        {"d.yaml": ONE.replace("    specialties:", "    specialities:")},
        "d.yaml:6:5: unknown key 'specialities' (did you mean 'specialties'?)",
        id="unknown-key",
    ),
    pytest.param(
        {"d.yaml": ONE + ONE.split("specialists:\n", 1)[1]},
        "d.yaml:9:9: specialist id 'heartwell' is also defined at d.yaml:3:9",
        id="duplicate-id-same-file",
    ),
    pytest.param(
        {
            "a.yaml": ONE,
            "b.csv": HEADER + "heartwell,Other (FAKE),,,,,email,document.pdf,,,,\n",
        },
        "b.csv:2:1: specialist id 'heartwell' is also defined at a.yaml:3:9",
        id="duplicate-id-across-files",
    ),
    pytest.param(
        {
            "d.yaml": ONE.replace(
                "    targets:\n      - {channel: specialist, format: hl7v2.ref_i12}\n",
                "    targets: []\n",
            )
        },
        "d.yaml:7:14: a specialist needs at least one target",
        id="no-targets",
    ),
    pytest.param(
        {"d.yaml": ONE.replace("format: hl7v2.ref_i12", "format: hl7v2.ref_i21")},
        "d.yaml:8:39: unknown format 'hl7v2.ref_i21' (did you mean 'hl7v2.ref_i12'?)",
        id="unknown-format",
    ),
    pytest.param(
        {"d.yaml": ONE.replace("channel: specialist", "channel: specialists")},
        "d.yaml:8:19: unknown channel 'specialists' (did you mean 'specialist'?) "
        "(engine.toml defines: email, fhir-specialist, specialist)",
        id="unknown-channel",
    ),
    pytest.param(
        {"d.yaml": ONE.replace("schema: referral-directory/v1", "schema: referral-directory/v2")},
        "d.yaml:1:9: expected `schema: referral-directory/v1` at the top",
        id="wrong-schema",
    ),
    pytest.param(
        {"d.yaml": ONE.replace('    npi: "1234567893"\n', '    npi: "1234567893"\n    npi: "1"\n')},
        "d.yaml:6:5: duplicate key 'npi' (first at line 5)",
        id="duplicate-yaml-key",
    ),
    pytest.param(
        {"d.csv": HEADER + "skin,Skin (FAKE),1555555551,,,,email,document.pdf,,,,\n"},
        "d.csv:2:3: an NPI is 10 digits",
        id="csv-wrong-npi",
    ),
    pytest.param(
        {"d.csv": HEADER + "skin,Skin (FAKE),,,,,email,document.pdf\n"},
        "d.csv:2:9: expected 12 columns (as the header), found 8",
        id="csv-short-row",
    ),
    pytest.param(
        {"d.csv": HEADER.replace("locations", "location") + "skin,Skin,,,,,email,x,,,,\n"},
        "d.csv:1:6: unknown column 'location' (did you mean 'locations'?)",
        id="csv-unknown-column",
    ),
    pytest.param(
        {"d.csv": "id,name,channel\nskin,Skin,email\n"},
        "d.csv:1:1: the header needs the columns format",
        id="csv-missing-column",
    ),
    pytest.param(
        {
            "d.csv": HEADER
            + "skin,Skin (FAKE),,,,,email,document.pdf,,,,\n"
            + "skin,Skin Two (FAKE),,,,,email,document.html,,,,\n"
        },
        "d.csv:3:2: name differs from row 2: a row repeating an id only adds a target",
        id="csv-repeat-differs",
    ),
    pytest.param(
        {"d.csv": HEADER + "skin,Skin (FAKE),,,,,email,document.pdf,,,,yes\n"},
        "d.csv:2:12: active must be true or false (empty: true)",
        id="csv-bad-active",
    ),
    pytest.param(
        {"d.csv": HEADER + "skin,Skin (FAKE),,,,,,document.pdf,,,,\n"},
        "d.csv:2:7: channel must be text",
        id="csv-no-channel",
    ),
    pytest.param(
        {"d.csv": HEADER + "skin,Skin (FAKE),,,,,e-mail,document.pdf,,,,\n"},
        "d.csv:2:7: unknown channel 'e-mail' (did you mean 'email'?)",
        id="csv-unknown-channel",
    ),
]


@pytest.mark.parametrize(("files", "expected"), BAD)
def test_bad_directory_is_refused_at_its_place(
    tmp_path: Path, files: dict[str, str], expected: str
) -> None:
    errors = errors_of(tmp_path, files, known_formats=FORMATS, known_channels=CHANNELS)
    assert len(errors) == 1, errors
    assert errors[0].startswith(expected), errors[0]


def test_channels_of_inactive_entries_are_not_checked(tmp_path: Path) -> None:
    files = {
        "d.yaml": ONE.replace("channel: specialist", "channel: later") + "    active: false\n",
        "e.csv": HEADER + "paper,Paper (FAKE),,,,,later,document.pdf,,,,false\n",
    }
    assert errors_of(tmp_path, files, known_channels=frozenset()) == []
    files["d.yaml"] = files["d.yaml"].replace("active: false", "active: true")
    assert [
        e.split(": ", 1)[0] for e in errors_of(tmp_path, files, known_channels=frozenset())
    ] == ["d.yaml:8:19"]


def test_every_error_is_collected(tmp_path: Path) -> None:
    files = {
        "a.yaml": ONE.replace('"1234567893"', '"1234567890"')
        + ONE.split("specialists:\n", 1)[1]
        .replace("heartwell", "b")
        .replace("specialties:", "specialtys:"),
        "b.csv": HEADER
        + "skin,Skin (FAKE),1,,,,email,document.pdf,,,,\n"
        + "skin2,Skin (FAKE),,,,,email,document.pdf\n",
    }
    locations = [e.split(": ", 1)[0] for e in errors_of(tmp_path, files)]
    assert locations == ["a.yaml:5:10", "a.yaml:12:5", "b.csv:3:9", "b.csv:2:3"]


def test_load_directory_raises_with_every_error(tmp_path: Path) -> None:
    (tmp_path / "d.yaml").write_text("schema: nope\n", encoding="utf-8")
    with pytest.raises(OutboundError) as caught:
        load_directory(tmp_path)
    assert caught.value.errors == [
        f"{tmp_path}/d.yaml:1:9: expected `schema: referral-directory/v1` at the top"
    ]
