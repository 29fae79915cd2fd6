"""Expected answers of the demo region, computed from the member source files.

Plain Python over the CSV files in federation-configs/demo/data, following the
mappings in federation-configs/demo/*.toml: nothing here asks fedgate or uses its
code, so the end-to-end tests compare fedgate's answers with an independent reading
of the same files. Run this file to print the values:

    python3 tests/python/fedgate_expected.py

What each member maps into the canonical datasets (the `[[mappings]]` of its toml;
none of them has a row filter, so every row of a source file is a row of the
dataset):

fever_clinics (region.toml: served by shanghai, hangzhou, suzhou, anji; hefei serves
no list, Anhui is missing from the published source):

    member    file                        county column   is_designated            address/phone
    shanghai  shanghai/fever_clinics.csv  区 (district)   NULL                     NULL / NULL
    hangzhou  hangzhou/fever_clinics.csv  district        designated 是/否          addr / tel
    suzhou    suzhou/fever_clinics.csv    county          is_designated = '1'      address / phone
    anji      anji/fever_clinics.csv      xq              ddyy Y/N                 dz / dh

    county_code is the county column looked up by name in the member's code table
    (data/<member>/district_codes.csv plus the `aliases` of its [[code_tables]]
    entry, which are read from the toml here); the code tables ignore white space.
    A name the table lacks gives NULL (none occurs: see data/UNMAPPED.md, every
    unmatched name has an alias).

census (all five members), pop_total:

    shanghai  shanghai/census_2020.csv  pop_total
    hangzhou  hangzhou/census_2020.csv  round(常住人口_万人 * 10000); the file keeps exactly
              four decimals of 万人 (ORIGIN.md), so the product is exact: computed with
              Decimal here, which equals the gateway's float round() for such values
    suzhou    suzhou/census_2020.csv    总人口
    hefei     hefei/census_2020.csv     population
    anji      anji/census_2020.csv      rk

enrollment (hangzhou ybcb.csv 公民身份号码, suzhou insured.csv sfzh): id_number is
upper(trim(value)) when it is 17 digits and a digit or X, else NULL.

The per-member numbers agree with data/expected.md (generated from the shared source
files by scripts/build_demo_data.py); `check_against_expected_md` compares them.
"""

from __future__ import annotations

import csv
import os
import re
import tomllib
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

REPO = Path(os.environ.get("FEDGATE_REPO") or Path(__file__).resolve().parents[2])
CONFIGS = REPO / "federation-configs" / "demo"
DATA = CONFIGS / "data"

GATEWAY_MEMBERS = ["shanghai", "hangzhou", "suzhou", "hefei", "anji"]
# Every gateway in region order (the port order of `fedgate demo --port-base`): the
# members that serve data, then the regional office's own gateway, which serves none.
OFFICE_GATEWAY = "coordination"
GATEWAYS = GATEWAY_MEMBERS + [OFFICE_GATEWAY]
FEVER_CLINIC_MEMBERS = ["shanghai", "hangzhou", "suzhou", "anji"]
ENROLLMENT_MEMBERS = ["hangzhou", "suzhou"]
# The canonical datasets of region.toml.
DATASETS = ["divisions", "census", "fever_clinics", "enrollment", "underground_pipelines"]

# fever_clinics: the source columns each member maps (see the module docstring).
FEVER_CLINIC_SPECS = {
    "shanghai": dict(file="shanghai/fever_clinics.csv", county="区", name="医院名称",
                     address=None, phone=None, designated=None),
    "hangzhou": dict(file="hangzhou/fever_clinics.csv", county="district", name="hospital",
                     address="addr", phone="tel", designated=("designated", {"是": True, "否": False})),
    "suzhou": dict(file="suzhou/fever_clinics.csv", county="county", name="name",
                   address="address", phone="phone", designated=("is_designated", "=1")),
    "anji": dict(file="anji/fever_clinics.csv", county="xq", name="yymc",
                 address="dz", phone="dh", designated=("ddyy", {"Y": True, "N": False})),
}

# census: the file and how pop_total is read from it.
CENSUS_SPECS = {
    "shanghai": ("shanghai/census_2020.csv", "pop_total", 1),
    "hangzhou": ("hangzhou/census_2020.csv", "常住人口_万人", 10000),
    "suzhou": ("suzhou/census_2020.csv", "总人口", 1),
    "hefei": ("hefei/census_2020.csv", "population", 1),
    "anji": ("anji/census_2020.csv", "rk", 1),
}

ENROLLMENT_SPECS = {
    "hangzhou": ("hangzhou/ybcb.csv", "公民身份号码"),
    "suzhou": ("suzhou/insured.csv", "sfzh"),
}

# Parameters the service tests use; `check_codes` verifies they exist in the data.
HANGZHOU_XIHU = "330106"  # 西湖区, a Hangzhou district
ANJI_COUNTY = "330523"  # 安吉县, Huzhou prefecture
ENROLLED_ID = "330106198703151232"  # the fixed hangzhou test person (ORIGIN.md)

# The queries the tests send, whose answers fever_clinic_counts and census_population
# give.
PER_MEMBER_CLINICS_SQL = (
    "SELECT member, count(*) AS hospitals FROM fever_clinics GROUP BY member ORDER BY member"
)
PER_MEMBER_POPULATION_SQL = (
    "SELECT member, sum(pop_total) AS population FROM census GROUP BY member ORDER BY member"
)


def read_csv(rel: str) -> list[dict[str, str]]:
    with open(DATA / rel, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def member_config(member: str) -> dict:
    with open(CONFIGS / f"{member}.toml", "rb") as f:
        return tomllib.load(f)


def _squash(s: str) -> str:
    """Code tables ignore white space (data/ORIGIN.md)."""
    return re.sub(r"\s+", "", s)


def district_table(member: str) -> dict[str, str]:
    """Name -> NBS 2023 code: the member's district_codes.csv plus its toml aliases."""
    table = {_squash(r["name"]): r["code"] for r in read_csv(f"{member}/district_codes.csv")}
    for ct in member_config(member).get("code_tables", []):
        if ct["name"] == "district":
            for name, code in ct.get("aliases", {}).items():
                table[_squash(name)] = code
    return table


def _blank_to_none(v):
    return None if v is None or v == "" else v


@dataclass(frozen=True)
class Clinic:
    member: str
    hospital_name: str
    county_published: str
    county_code: str | None
    address: str | None
    phone: str | None
    is_designated: bool | None


def fever_clinics() -> list[Clinic]:
    out = []
    for member in FEVER_CLINIC_MEMBERS:
        spec = FEVER_CLINIC_SPECS[member]
        table = district_table(member)
        for r in read_csv(spec["file"]):
            designated = None
            if spec["designated"] is not None:
                col, how = spec["designated"]
                v = r[col]
                if how == "=1":  # SQL `is_designated = '1'`: NULL stays NULL
                    designated = None if v == "" else v == "1"
                else:  # CASE v WHEN ... END: anything else is NULL
                    designated = how.get(v)
            out.append(Clinic(
                member=member,
                hospital_name=r[spec["name"]],
                county_published=r[spec["county"]],
                county_code=table.get(_squash(r[spec["county"]])),
                address=_blank_to_none(r[spec["address"]]) if spec["address"] else None,
                phone=_blank_to_none(r[spec["phone"]]) if spec["phone"] else None,
                is_designated=designated,
            ))
    return out


def fever_clinic_counts() -> dict[str, int]:
    counts = {m: 0 for m in FEVER_CLINIC_MEMBERS}
    for c in fever_clinics():
        counts[c.member] += 1
    return counts


def census_population() -> dict[str, int]:
    out = {}
    for member, (rel, col, scale) in CENSUS_SPECS.items():
        total = 0
        for r in read_csv(rel):
            v = Decimal(r[col]) * scale
            if v != v.to_integral_value():
                raise ValueError(f"{rel}: {col}={r[col]} x {scale} is not a whole number")
            total += int(v)
        out[member] = total
    return out


def census_county_codes() -> dict[str, set[str]]:
    """County codes per member where the file has a code column (suzhou's has none)."""
    cols = {"shanghai": "code", "hangzhou": "区划代码", "hefei": "county_code", "anji": "dm"}
    return {m: {r[c] for r in read_csv(CENSUS_SPECS[m][0])} for m, c in cols.items()}


def enrolled_ids() -> dict[str, set[str]]:
    out = {}
    for member, (rel, col) in ENROLLMENT_SPECS.items():
        ids = set()
        for r in read_csv(rel):
            v = r[col].strip().upper()
            if re.fullmatch(r"[0-9]{17}[0-9X]", v):
                ids.add(v)
        out[member] = ids
    return out


def enrollment_check(id_number: str) -> dict[str, int]:
    """enrollment_check: 1 where a member serving enrollment has the ID, else 0."""
    return {m: int(id_number in ids) for m, ids in enrolled_ids().items()}


@dataclass(frozen=True)
class NearRow:
    member: str
    county_code: str
    hospital_name: str
    address: str | None
    phone: str | None
    is_designated: bool | None
    in_county: bool


def fever_clinics_near(county_code: str) -> list[NearRow]:
    """The fever_clinics_near service: hospitals of the prefecture-level city (first 4
    digits of county_code), ordered in_county DESC, county_code, hospital_name."""
    prefix = county_code[:4]
    rows = [
        NearRow(c.member, c.county_code, c.hospital_name, c.address, c.phone,
                c.is_designated, c.county_code == county_code)
        for c in fever_clinics()
        if c.county_code is not None and c.county_code.startswith(prefix)
    ]
    rows.sort(key=lambda r: (not r.in_county, r.county_code, r.hospital_name))
    return rows


@dataclass
class Expected:
    fever_clinic_counts: dict[str, int] = field(default_factory=fever_clinic_counts)
    census_population: dict[str, int] = field(default_factory=census_population)

    @property
    def total_fever_clinics(self) -> int:
        return sum(self.fever_clinic_counts.values())


def parse_expected_md() -> dict[str, dict[str, int | None]]:
    """The per-member table of data/expected.md: fever-clinic rows and population."""
    out = {}
    for line in (DATA / "expected.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0] in GATEWAY_MEMBERS:
            clinics = None if "no file" in cells[1] else int(cells[1])
            out[cells[0]] = {"fever_clinics": clinics, "population": int(cells[3])}
    return out


def check_against_expected_md() -> list[str]:
    """Differences between the values computed here and data/expected.md (none expected)."""
    md = parse_expected_md()
    problems = []
    if sorted(md) != sorted(GATEWAY_MEMBERS):
        problems.append(f"expected.md lists members {sorted(md)}")
    counts, pops = fever_clinic_counts(), census_population()
    for m, facts in md.items():
        want = facts["fever_clinics"]
        got = counts.get(m)
        if want != got:
            problems.append(f"{m}: fever clinics computed {got}, expected.md {want}")
        if facts["population"] != pops.get(m):
            problems.append(f"{m}: population computed {pops.get(m)}, expected.md {facts['population']}")
    return problems


def check_codes() -> list[str]:
    """The service parameters the tests use exist in the data."""
    problems = []
    hz = {r["code"] for r in read_csv("hangzhou/district_codes.csv")}
    if HANGZHOU_XIHU not in hz or HANGZHOU_XIHU not in census_county_codes()["hangzhou"]:
        problems.append(f"{HANGZHOU_XIHU} is not a hangzhou district in the data")
    aj = {r["code"] for r in read_csv("anji/district_codes.csv")}
    if ANJI_COUNTY not in aj or ANJI_COUNTY not in census_county_codes()["anji"]:
        problems.append(f"{ANJI_COUNTY} is not anji's county in the data")
    if not enrollment_check(ENROLLED_ID)["hangzhou"]:
        problems.append(f"{ENROLLED_ID} is not enrolled at hangzhou in the data")
    return problems


if __name__ == "__main__":
    e = Expected()
    print("fever-clinic hospitals per member:", e.fever_clinic_counts, "total", e.total_fever_clinics)
    print("census population per member:", e.census_population)
    print(f"enrollment_check({ENROLLED_ID}):", enrollment_check(ENROLLED_ID))
    for code in (HANGZHOU_XIHU, ANJI_COUNTY):
        rows = fever_clinics_near(code)
        print(f"fever_clinics_near({code}): {len(rows)} rows, "
              f"{sum(r.in_county for r in rows)} in the county, members {sorted({r.member for r in rows})}")
    unmapped = [c for c in fever_clinics() if c.county_code is None]
    print("fever clinics with no county code:", len(unmapped))
    print("differences from data/expected.md:", check_against_expected_md() or "none")
    print("parameter checks:", check_codes() or "ok")
