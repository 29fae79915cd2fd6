"""The expected values themselves (no server needed): fedgate_expected reads the files
the member configurations map, the way they map them, and agrees with
data/expected.md."""

from __future__ import annotations

import fedgate_expected as fx


def mapping(member: str, dataset: str) -> tuple[dict, dict]:
    """(mapping, source) of a member's dataset in its toml."""
    cfg = fx.member_config(member)
    (m,) = [m for m in cfg["mappings"] if m["dataset"] == dataset]
    (src,) = [s for s in cfg["sources"] if s["name"] == m["source"]]
    return m, src


def column_of(spec) -> str:
    return spec["column"] if isinstance(spec, dict) else spec


def test_specs_follow_the_member_configs():
    for member, spec in fx.FEVER_CLINIC_SPECS.items():
        m, src = mapping(member, "fever_clinics")
        assert src["path"] == f"data/{spec['file']}", member
        assert "filter" not in m, f"{member}: a row filter the expected values ignore"
        assert column_of(m["fields"]["county_code"]) == spec["county"], member
        assert m["fields"]["county_code"]["code_table"] == "district", member
        assert column_of(m["fields"]["hospital_name"]) == spec["name"], member
    for member, (rel, col, _) in fx.CENSUS_SPECS.items():
        m, src = mapping(member, "census")
        assert src["path"] == f"data/{rel}", member
        assert "filter" not in m
        assert col in column_of(m["fields"]["pop_total"]), member
    for member, (rel, col) in fx.ENROLLMENT_SPECS.items():
        m, src = mapping(member, "enrollment")
        assert src["path"] == f"data/{rel}", member
        assert col in m["fields"]["id_number"], member


def test_members_of_the_region():
    import tomllib

    region = tomllib.loads((fx.CONFIGS / "region.toml").read_text(encoding="utf-8"))
    gateways = [m["name"] for m in region["members"] if m.get("endpoint")]
    assert gateways == fx.GATEWAYS  # the port order of `fedgate demo --port-base`
    serving = lambda d: [m["name"] for m in region["members"] if d in m.get("serves", [])]  # noqa: E731
    assert serving("fever_clinics") == fx.FEVER_CLINIC_MEMBERS
    assert serving("enrollment") == fx.ENROLLMENT_MEMBERS
    assert [d["name"] for d in region["datasets"]] == fx.DATASETS


def test_agrees_with_expected_md():
    assert fx.check_against_expected_md() == []


def test_every_clinic_has_a_county_code():
    # data/UNMAPPED.md: every unmatched county name has an alias in the configs.
    assert [c for c in fx.fever_clinics() if c.county_code is None] == []


def test_service_parameters_exist_in_the_data():
    assert fx.check_codes() == []
