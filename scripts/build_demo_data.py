#!/usr/bin/env python3
"""Build the local data files of the five fedgate demo members.

The demo federation has five members: shanghai, hangzhou, suzhou, hefei and
anji. Each member keeps its data in its OWN local layout (own column names,
units, date formats, code-based or name-based). That is the point of the demo:
the gateway maps these local layouts onto canonical datasets.

All values come from the real public data in /work/shared/data (see
SOURCES.md there). This script only changes layout: column names and order,
units (persons -> 10,000 persons for hangzhou, percent strings for hefei),
boolean spelling and date format. It never invents, cleans or corrects a
value. In particular the county names of the fever-clinic lists are kept
exactly as the health commissions published them (typos, abolished districts,
informal units), because mapping them is the gateway's job.

Outputs (under federation-configs/demo/data/):
  <member>/...csv   the local data files
  ORIGIN.md         where every file comes from, and the licences
  UNMAPPED.md       county values that do not match the member's code table
  expected.md       facts for tests, computed directly from the source files
and, in federation-configs/demo/region.toml, each member's `location` line (the
division centre points of yrd_division_centroids_adcode2016.csv, for the board's map).

ORIGIN.md and expected.md end with a section that scripts/build_enrollment_data.py
writes (the SYNTHETIC enrollment data, hangzhou/ybcb.csv and suzhou/insured.csv);
this script keeps that section as it is. Run it before build_enrollment_data.py,
which reads the code tables written here.

The files are generated: do not edit them by hand, re-run this script.
Output is deterministic (no timestamps, source order kept, sorted reports),
so re-running yields byte-identical files.

Usage:
  python3 scripts/build_demo_data.py [--shared DIR] [--out DIR] [--region FILE]

Python 3.11, standard library only.
"""

from __future__ import annotations

import argparse
import csv
import io
import re
import sys
from collections import Counter
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SHARED = REPO_ROOT.parent / "shared" / "data"
DEFAULT_OUT = REPO_ROOT / "federation-configs" / "demo" / "data"

NBS_FILE = "yrd_divisions_nbs2023.csv"
CENTROIDS_FILE = "yrd_division_centroids_adcode2016.csv"
DEFAULT_REGION = REPO_ROOT / "federation-configs" / "demo" / "region.toml"
CENSUS_FILE = "yrd_census2020_county.csv"
FEVER_FILE = "yrd_fever_clinic_hospitals_2020.csv"

# Member -> (Chinese name, 6-digit code of the unit the member covers).
# anji is a county (of 湖州市 330500), the others are prefecture-level cities.
MEMBERS = {
    "shanghai": ("上海市", "310100"),
    "hangzhou": ("杭州市", "330100"),
    "suzhou": ("苏州市", "320500"),
    "hefei": ("合肥市", "340100"),
    "anji": ("安吉县", "330523"),
}
ANJI_CITY_CODE = "330500"  # 湖州市
ANJI_CITY_NAME = "湖州市"
ANJI_COUNTY_NAME = "安吉县"


# --------------------------------------------------------------------------
# Reading and writing
# --------------------------------------------------------------------------

def read_csv(path: Path) -> list[dict[str, str]]:
    """Read a source CSV as text (codes stay strings, leading zeros kept)."""
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


class Writer:
    """Collects written files so that the run can be summarised and checked."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.written: dict[str, int] = {}  # relative path -> data rows

    def csv(self, rel: str, header: list[str], rows: list[list[str]]) -> None:
        # UTF-8, no BOM, "\n" line endings, quote only when needed.
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
        w.writerow(header)
        for row in rows:
            assert len(row) == len(header), (rel, row)
            w.writerow(row)
        self._write(rel, buf.getvalue())
        self.written[rel] = len(rows)

    def text(self, rel: str, content: str) -> None:
        self._write(rel, content)
        self.written[rel] = -1

    def _write(self, rel: str, content: str) -> None:
        path = self.out_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        # newline="" so that "\n" is written as is on every platform.
        with path.open("w", encoding="utf-8", newline="") as f:
            f.write(content)


# --------------------------------------------------------------------------
# Source selections (shared by all members)
# --------------------------------------------------------------------------

class Source:
    def __init__(self, shared: Path) -> None:
        self.nbs = read_csv(shared / NBS_FILE)
        self.census = read_csv(shared / CENSUS_FILE)
        self.fever = read_csv(shared / FEVER_FILE)

    # NBS 2023 ------------------------------------------------------------
    def nbs_row(self, code: str) -> dict[str, str]:
        rows = [r for r in self.nbs if r["code"] == code]
        assert len(rows) == 1, code
        return rows[0]

    def nbs_counties(self, city_code: str) -> list[dict[str, str]]:
        """County rows of a city, in source (code) order."""
        return [r for r in self.nbs
                if r["level"] == "county" and r["city_code"] == city_code]

    def nbs_division_rows(self, member: str) -> list[dict[str, str]]:
        """The city row followed by its county rows; anji: only its own row."""
        _, code = MEMBERS[member]
        if member == "anji":
            return [self.nbs_row(code)]
        return [self.nbs_row(code)] + self.nbs_counties(code)

    def code_table(self, member: str) -> list[tuple[str, str]]:
        """(name, code) of the NBS 2023 counties of the member."""
        _, code = MEMBERS[member]
        if member == "anji":
            r = self.nbs_row(code)
            return [(r["name"], r["code"])]
        return [(r["name"], r["code"]) for r in self.nbs_counties(code)]

    # Census 2020 ---------------------------------------------------------
    def census_counties(self, member: str) -> list[dict[str, str]]:
        """County-level census rows of the member (2020 codes).

        Selected by code prefix: the first four digits of a county code are
        its city. This keeps 2020-only codes such as 330103 下城区 or
        320571 苏州工业园区, which NBS 2023 no longer has.
        """
        _, code = MEMBERS[member]
        if member == "anji":
            rows = [r for r in self.census if r["code"] == code]
        else:
            rows = [r for r in self.census
                    if r["level"] == "county" and r["code"][:4] == code[:4]]
        assert rows, member
        return rows

    # Fever clinics 2020 --------------------------------------------------
    def fever_rows(self, member: str) -> list[dict[str, str]]:
        """Fever-clinic rows of the member, in source order.

        hefei: none, Anhui is missing from the source.
        anji: the 湖州市 rows whose published county is 安吉县.
        """
        _, code = MEMBERS[member]
        if member == "anji":
            return [r for r in self.fever
                    if r["city_code"] == ANJI_CITY_CODE
                    and r["county"] == ANJI_COUNTY_NAME]
        return [r for r in self.fever if r["city_code"] == code]


# --------------------------------------------------------------------------
# Small value converters (layout only, exact and reversible)
# --------------------------------------------------------------------------

def to_wan(persons: str) -> str:
    """Persons -> 万人 with exactly 4 decimals, by integer arithmetic.

    No float is involved, so value * 10000 gives the source integer back.
    """
    n = int(persons)
    assert n >= 0, persons
    return f"{n // 10000}.{n % 10000:04d}"


def to_percent(value: str) -> str:
    """'12.05' -> '12.05%' (source digits kept; empty stays empty)."""
    return f"{value}%" if value != "" else ""


def date_parts(iso: str) -> tuple[str, str, str]:
    y, m, d = iso.split("-")
    assert len(y) == 4 and len(m) == 2 and len(d) == 2, iso
    return y, m, d


def date_slash(iso: str) -> str:  # 2020-01-22 -> 2020/01/22
    return "/".join(date_parts(iso))


def date_compact(iso: str) -> str:  # 2020-01-22 -> 20200122
    return "".join(date_parts(iso))


def designated(value: str, yes: str, no: str) -> str:
    """Source booleans are 'true'/'false'; anything else is an error."""
    assert value in ("true", "false"), value
    return yes if value == "true" else no


# --------------------------------------------------------------------------
# Members. One function per member; each writes that member's local layout.
# --------------------------------------------------------------------------

def build_shanghai(src: Source, w: Writer) -> None:
    # Divisions: English columns, level values as in NBS (city/county).
    w.csv("shanghai/divisions.csv", ["code", "name", "level", "parent"],
          [[r["code"], r["name"], r["level"], r["parent_code"]]
           for r in src.nbs_division_rows("shanghai")])

    # Census: code-based, English names, values copied as is.
    w.csv("shanghai/census_2020.csv",
          ["code", "county", "pop_total", "pop_male", "pop_female",
           "pop_urban", "pop_rural", "family_households",
           "share_age_65_plus_pct", "avg_years_schooling"],
          [[r["code"], r["county"], r["pop_total"], r["pop_male"],
            r["pop_female"], r["pop_urban"], r["pop_rural"],
            r["family_households"], r["share_age_65_plus_pct"],
            r["avg_years_schooling"]]
           for r in src.census_counties("shanghai")])

    # Fever clinics: Shanghai published names only, so the local file has
    # district, name, publisher and date (ISO date as in the source).
    w.csv("shanghai/fever_clinics.csv", ["区", "医院名称", "发布机构", "发布日期"],
          [[r["county"], r["name"], r["source"], r["source_date"]]
           for r in src.fever_rows("shanghai")])

    write_code_table(src, w, "shanghai")


def build_hangzhou(src: Source, w: Writer) -> None:
    # Divisions: Chinese headers, level as 市 / 区县.
    level_zh = {"city": "市", "county": "区县"}
    w.csv("hangzhou/xzqh.csv", ["区划代码", "区划名称", "层级", "上级代码"],
          [[r["code"], r["name"], level_zh[r["level"]], r["parent_code"]]
           for r in src.nbs_division_rows("hangzhou")])

    # Census: code-based, population in 万人 (4 decimals, exact);
    # households stay integers, share and schooling as in the source.
    w.csv("hangzhou/census_2020.csv",
          ["区划代码", "区县", "常住人口_万人", "男_万人", "女_万人",
           "城镇人口_万人", "乡村人口_万人", "家庭户数", "65岁及以上占比",
           "平均受教育年限"],
          [[r["code"], r["county"], to_wan(r["pop_total"]),
            to_wan(r["pop_male"]), to_wan(r["pop_female"]),
            to_wan(r["pop_urban"]), to_wan(r["pop_rural"]),
            r["family_households"], r["share_age_65_plus_pct"],
            r["avg_years_schooling"]]
           for r in src.census_counties("hangzhou")])

    # Fever clinics: designated as 是/否, date as 2020/01/22.
    w.csv("hangzhou/fever_clinics.csv",
          ["district", "hospital", "addr", "tel", "hours", "designated",
           "notice_date"],
          [[r["county"], r["name"], r["address"], r["tel"], r["hours"],
            designated(r["is_designated"], "是", "否"),
            date_slash(r["source_date"])]
           for r in src.fever_rows("hangzhou")])

    write_code_table(src, w, "hangzhou")


def build_suzhou(src: Source, w: Writer) -> None:
    # Divisions: level as numbers, 2 = city, 3 = county.
    level_num = {"city": "2", "county": "3"}
    w.csv("suzhou/divisions.csv",
          ["division_code", "division_name", "division_level", "parent_code"],
          [[r["code"], r["name"], level_num[r["level"]], r["parent_code"]]
           for r in src.nbs_division_rows("suzhou")])

    # Census: NAME-based (no code column). Names as published in the census,
    # e.g. 苏州工业园区 (2020 code 320571, now 320576).
    w.csv("suzhou/census_2020.csv",
          ["区县名称", "总人口", "男性", "女性", "城镇", "乡村", "家庭户",
           "老年占比", "受教育年限"],
          [[r["county"], r["pop_total"], r["pop_male"], r["pop_female"],
            r["pop_urban"], r["pop_rural"], r["family_households"],
            r["share_age_65_plus_pct"], r["avg_years_schooling"]]
           for r in src.census_counties("suzhou")])

    # Fever clinics: is_designated as 1/0, date as 20200122.
    w.csv("suzhou/fever_clinics.csv",
          ["county", "name", "address", "phone", "level", "is_designated",
           "date"],
          [[r["county"], r["name"], r["address"], r["tel"], r["level"],
            designated(r["is_designated"], "1", "0"),
            date_compact(r["source_date"])]
           for r in src.fever_rows("suzhou")])

    write_code_table(src, w, "suzhou")


def build_hefei(src: Source, w: Writer) -> None:
    # Divisions: same layout as shanghai.
    w.csv("hefei/divisions.csv", ["code", "name", "level", "parent"],
          [[r["code"], r["name"], r["level"], r["parent_code"]]
           for r in src.nbs_division_rows("hefei")])

    # Census: code-based; the 65+ share as a percent string ("12.05%").
    # Note: the three development zones carry their 2020 codes 340171-340173
    # (NBS 2023: 340176-340178); kept as published.
    w.csv("hefei/census_2020.csv",
          ["county_code", "county_name", "population", "male", "female",
           "urban", "rural", "households", "aged_65_plus", "schooling_years"],
          [[r["code"], r["county"], r["pop_total"], r["pop_male"],
            r["pop_female"], r["pop_urban"], r["pop_rural"],
            r["family_households"], to_percent(r["share_age_65_plus_pct"]),
            r["avg_years_schooling"]]
           for r in src.census_counties("hefei")])

    # No fever-clinic file: Anhui is missing from the source, and we do not
    # invent data. hefei's data is code-based, so no code table either.
    assert not src.fever_rows("hefei")


def build_anji(src: Source, w: Writer) -> None:
    # Divisions: only anji's own row, pinyin-abbreviation headers.
    w.csv("anji/divisions.csv", ["dm", "mc", "jb", "sjdm"],
          [[r["code"], r["name"], r["level"], r["parent_code"]]
           for r in src.nbs_division_rows("anji")])

    w.csv("anji/census_2020.csv",
          ["dm", "mc", "rk", "nan", "nv", "cz", "xc", "hs", "lnzb", "jynx"],
          [[r["code"], r["county"], r["pop_total"], r["pop_male"],
            r["pop_female"], r["pop_urban"], r["pop_rural"],
            r["family_households"], r["share_age_65_plus_pct"],
            r["avg_years_schooling"]]
           for r in src.census_counties("anji")])

    # Fever clinics: the 湖州市 list, rows of 安吉县; ddyy as Y/N.
    w.csv("anji/fever_clinics.csv",
          ["xq", "yymc", "dz", "dh", "sj", "ddyy", "fbrq"],
          [[r["county"], r["name"], r["address"], r["tel"], r["hours"],
            designated(r["is_designated"], "Y", "N"), r["source_date"]]
           for r in src.fever_rows("anji")])

    write_code_table(src, w, "anji")


def write_code_table(src: Source, w: Writer, member: str) -> None:
    # County name -> code for name-based members. NBS 2023 names only, no
    # aliases: aliases are configuration the gateway engineer decides on
    # (see UNMAPPED.md).
    w.csv(f"{member}/district_codes.csv", ["name", "code"],
          [[name, code] for name, code in src.code_table(member)])


# --------------------------------------------------------------------------
# UNMAPPED.md: county values that a plain name lookup cannot resolve
# --------------------------------------------------------------------------

# Suggested alias targets, reviewed by hand against the published rows
# (addresses) and the 2021 Hangzhou and earlier Suzhou boundary facts.
# Key: (member, published value). Value: (target code or None, reason).
# Only used for the report; a value found in the data but missing here is
# reported as "no suggestion" so that nothing is silently dropped.
ALIAS_SUGGESTIONS: dict[tuple[str, str], tuple[str | None, str]] = {
    ("hangzhou", "下城区"): (
        "330105",
        "下城区 (330103) was abolished in 2021 and merged as a whole into "
        "拱墅区 330105."),
    ("hangzhou", "江干区"): (
        "330102",
        "江干区 (330104) was abolished in 2021; most of it (all but 下沙/白杨 "
        "streets, which went to 钱塘区) merged into 上城区 330102. The 4 "
        "rows' addresses (庆春东路, 机场路, 环丁路) are all in the part that "
        "went to 上城区."),
    ("hangzhou", "钱塘新区"): (
        "330114",
        "钱塘新区 was the functional zone (2019) that became the "
        "administrative district 钱塘区 330114 in 2021. Caveat: 2 of its 5 "
        "rows look misfiled in the source (name 风景名胜区 with address "
        "'地址'; 浙江医院 at 灵隐路12号 is in 西湖区), kept as published."),
    ("suzhou", "工业园区"): (
        "320576",
        "Short form of 苏州工业园区 (NBS 2023 code 320576; 2020 code 320571)."),
    ("suzhou", "高新区"): (
        "320505",
        "苏州高新区 and 虎丘区 are one administrative unit (区政合一), "
        "code 320505."),
}

# Values that should stay unmapped because they name no county. None occur
# in the four name-based members of this demo, but the rule is recorded so
# that the report says what to do when they appear.
NO_COUNTY_VALUES = {"", "市直", "市本级"}


def unmapped_report(src: Source) -> str:
    lines: list[str] = []
    add = lines.append
    add("# Unmapped county values (report for the gateway engineer)")
    add("")
    add("Generated by `scripts/build_demo_data.py`; do not edit by hand.")
    add("")
    add("For each name-based member this lists every distinct county value in")
    add("its local `fever_clinics.csv` (and, for suzhou, `census_2020.csv`)")
    add("that does NOT exactly equal a `name` in that member's")
    add("`district_codes.csv` (NBS 2023 names). Exact comparison: a value with")
    add("a stray space would be listed too. The data files keep these values")
    add("as published; resolving them (aliases, or leaving them unmapped) is the")
    add("gateway's configuration.")
    add("")
    add("Suggested targets are suggestions, checked against the published")
    add("addresses; they are not in the data files.")
    add("")

    total_unmapped_rows = 0
    for member in ("shanghai", "hangzhou", "suzhou", "anji"):
        names = {n for n, _ in src.code_table(member)}
        checks: list[tuple[str, list[str]]] = [
            (f"{member}/fever_clinics.csv",
             [r["county"] for r in src.fever_rows(member)]),
        ]
        if member == "suzhou":
            checks.append(("suzhou/census_2020.csv",
                           [r["county"] for r in src.census_counties(member)]))

        add(f"## {member} ({MEMBERS[member][0]})")
        add("")
        for rel, values in checks:
            counts = Counter(v for v in values if v not in names)
            add(f"### `{rel}` ({len(values)} rows, "
                f"{sum(counts.values())} unmatched)")
            add("")
            if not counts:
                add("All values match a name in `district_codes.csv`.")
                add("")
                continue
            total_unmapped_rows += sum(counts.values())
            add("| value | rows | suggested code | reason |")
            add("|---|---:|---|---|")
            # Sorted by row count (desc), then value: deterministic.
            for value, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
                shown = f"`{value}`" if value else "(empty)"
                if value in NO_COUNTY_VALUES:
                    code, reason = None, ("Names no county (city-level or "
                                          "missing): leave unmapped.")
                elif (member, value) in ALIAS_SUGGESTIONS:
                    code, reason = ALIAS_SUGGESTIONS[(member, value)]
                else:
                    code, reason = None, "No suggestion: check by hand."
                add(f"| {shown} | {n} | {code or 'leave unmapped'} | {reason} |")
            add("")

    add("## Values that should stay unmapped")
    add("")
    add("None of the values above: each unmatched value in these four members")
    add("names a real county-level unit. Values that name no county, such as")
    add("`市直`, `市本级` or an empty county, should stay unmapped rather than")
    add("be forced onto a county. They do not occur in these members, but they")
    add("do occur in other cities of the source (not part of the demo):")
    add("")
    # Computed, not typed, so that the statement stays true to the source.
    elsewhere = Counter((r["city"], r["county"]) for r in src.fever
                        if r["county"] in NO_COUNTY_VALUES)
    for (city, value), n in sorted(elsewhere.items(),
                                   key=lambda kv: (-kv[1], kv[0])):
        add(f"- {city}: {'`' + value + '`' if value else '(empty)'}, {n} rows")
    add("")
    add("## Code-level notes (census codes, not name lookups)")
    add("")
    add("The census files use 2020 codes (suzhou's file has no code column, but")
    add("its rows have them in the source). Codes not in NBS 2023:")
    add("")
    nbs_codes = {r["code"] for r in src.nbs}
    for member, rel in (("shanghai", "shanghai/census_2020.csv"),
                        ("hangzhou", "hangzhou/census_2020.csv"),
                        ("suzhou", "suzhou/census_2020.csv"),
                        ("hefei", "hefei/census_2020.csv"),
                        ("anji", "anji/census_2020.csv")):
        missing = [(r["code"], r["county"]) for r in src.census_counties(member)
                   if r["code"] not in nbs_codes]
        if missing:
            shown = ", ".join(f"`{c}` {n}" for c, n in missing)
            add(f"- `{rel}`: {shown}.")
        else:
            add(f"- `{rel}`: all codes are in NBS 2023.")
    add("")
    add("Known successors: 330103 下城区 -> 330105 拱墅区; 330104 江干区 -> mostly")
    add("330102 上城区 (下沙/白杨 -> 330114 钱塘区); 320571 苏州工业园区 -> 320576;")
    add("340171/340172/340173 (合肥 development zones) -> 340176/340177/340178.")
    add("Conversely NBS 2023 has 330113 临平区 and 330114 钱塘区 (created 2021),")
    add("which have no 2020 census row.")
    add("")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# expected.md: facts for tests, computed straight from the source files
# --------------------------------------------------------------------------

def expected_facts(shared: Path) -> tuple[str, dict[str, object]]:
    """Compute test facts from the raw source files, deliberately NOT via
    the Source selections above nor the derived files, so that the facts are
    an independent check. Selections here use the name columns (city/county
    names) where the builders use codes, and the results are cross-checked
    in main().
    """
    nbs = read_csv(shared / NBS_FILE)
    census = read_csv(shared / CENSUS_FILE)
    fever = read_csv(shared / FEVER_FILE)

    # Member -> (province name, city name as in each source).
    # NBS calls Shanghai's city level 市辖区; census calls it 上海市.
    city_names = {
        "shanghai": ("上海市", "市辖区", "上海市"),
        "hangzhou": ("浙江省", "杭州市", "杭州市"),
        "suzhou": ("江苏省", "苏州市", "苏州市"),
        "hefei": ("安徽省", "合肥市", "合肥市"),
    }

    facts: dict[str, dict[str, int]] = {}
    for member in MEMBERS:
        if member == "anji":
            fever_n = sum(1 for r in fever
                          if r["city"] == ANJI_CITY_NAME
                          and r["county"] == ANJI_COUNTY_NAME)
            census_rows = [r for r in census
                           if r["city"] == ANJI_CITY_NAME
                           and r["county"] == ANJI_COUNTY_NAME]
            div_counties = sum(1 for r in nbs
                               if r["city_name"] == ANJI_CITY_NAME
                               and r["name"] == ANJI_COUNTY_NAME)
        else:
            prov, nbs_city, census_city = city_names[member]
            fever_n = sum(1 for r in fever
                          if r["province"] == prov and r["city"] == MEMBERS[member][0])
            census_rows = [r for r in census
                           if r["province"] == prov and r["city"] == census_city
                           and r["level"] == "county"]
            div_counties = sum(1 for r in nbs
                               if r["province_name"] == prov
                               and r["city_name"] == nbs_city
                               and r["level"] == "county")
        facts[member] = {
            "fever_rows": fever_n,
            "census_pop_total": sum(int(r["pop_total"]) for r in census_rows),
            "census_county_rows": len(census_rows),
            "division_county_rows": div_counties,
        }

    xihu = [r for r in census if r["code"] == "330106"]
    assert len(xihu) == 1 and xihu[0]["county"] == "西湖区"
    xihu_pop = int(xihu[0]["pop_total"])

    # City-level census rows, for comparison with the county sums.
    city_total = {r["code"]: int(r["pop_total"]) for r in census
                  if r["level"] == "city"}

    lines: list[str] = []
    add = lines.append
    add("# Expected facts for tests")
    add("")
    add("Generated by `scripts/build_demo_data.py`; do not edit by hand.")
    add("Computed directly from `/work/shared/data/*.csv` (selecting by the")
    add("city/county NAME columns), not from the derived member files, which")
    add("the script selects by codes; the two are cross-checked at build time.")
    add("")
    add("| member | fever-clinic rows | census county rows | census population (sum of county pop_total) | divisions county rows | divisions rows incl. city row |")
    add("|---|---:|---:|---:|---:|---:|")
    for member, f in facts.items():
        fever_s = str(f["fever_rows"]) if member != "hefei" else "0 (no file)"
        div_total = (f["division_county_rows"] if member == "anji"
                     else f["division_county_rows"] + 1)
        add(f"| {member} | {fever_s} | {f['census_county_rows']} | "
            f"{f['census_pop_total']} | {f['division_county_rows']} | {div_total} |")
    add("")
    add(f"- Total fever-clinic rows over all members: "
        f"{sum(f['fever_rows'] for f in facts.values())}.")
    add(f"- Population of 西湖区 (330106), census 2020: {xihu_pop} "
        f"(hangzhou file: {to_wan(str(xihu_pop))} 万人).")
    add("- anji's divisions file has only its own county row (no city row).")
    add("")
    add("Census county sums versus the census city row (same source file):")
    add("")
    for member in ("shanghai", "hangzhou", "suzhou", "hefei"):
        code = MEMBERS[member][1]
        s = facts[member]["census_pop_total"]
        c = city_total[code]
        rel = "equal" if s == c else f"differ by {c - s}"
        add(f"- {member}: county sum {s}, city row {code} {c} ({rel}).")
    add("")
    add("Census rows are keyed by 2020 codes, divisions by NBS 2023 codes: the")
    add("county counts happen to agree, but the code sets differ (hangzhou census")
    add("has 330103 下城区/330104 江干区 but no 330113 临平区/330114 钱塘区;")
    add("hefei's three development zones are 340171-340173 in the census and")
    add("340176-340178 in NBS 2023; suzhou's 苏州工业园区 is 320571 vs 320576).")
    add("")
    return "\n".join(lines), facts


# --------------------------------------------------------------------------
# ORIGIN.md
# --------------------------------------------------------------------------

ORIGIN_MD = """\
# Origin of the demo member data

These files are made by `scripts/build_demo_data.py` from the real public data
in `/work/shared/data` (described in its `SOURCES.md`). **Do not edit them by
hand**: change the script and re-run it
(`python3 scripts/build_demo_data.py [--shared DIR]`). The output is
deterministic; re-running yields byte-identical files.

**Exception:** `hangzhou/ybcb.csv` and `suzhou/insured.csv` (dataset
`enrollment`) are SYNTHETIC: generated people, made by
`scripts/build_enrollment_data.py`; see "enrollment (SYNTHETIC)" at the end.
So are the pipeline files (dataset `underground_pipelines`):
`hangzhou/pipelines/*.csv` (loaded into two PostgreSQL databases and one MariaDB
database by `fedgate demo` with `hangzhou/pipelines/schema.sql` and
`schema.mysql.sql`) and `suzhou/pipelines.csv` (served by Suzhou's data lake,
`../lake/`), made by `scripts/build_pipelines_data.py` from a fixed seed. They are not real
infrastructure: numbers, roads, sizes and dates are drawn at random.
Everything said below about real data and unchanged values is about the
other files.

No value is invented, cleaned or corrected. The script changes only the layout:
which columns are kept, their names and order, units (hangzhou population in
万人, hefei 65+ share as a percent string), the spelling of booleans and the
date format. County names in the fever-clinic files are kept exactly as the
health commissions published them (typos, abolished districts, informal units).

All files: UTF-8 without BOM, comma-separated, header row, `\\n` line endings,
fields quoted only when needed.

## Sources and licences

| source file | upstream | licence / attribution |
|---|---|---|
| `yrd_divisions_nbs2023.csv` | modood/Administrative-divisions-of-China @ `57a0aa9c`; 国家统计局《2023年统计用区划代码和城乡划分代码》 (as of 2023-06-30) | WTFPL v2 |
| `yrd_census2020_county.csv` | leiii/census @ `0ba0f1ef`, `census_county_2020_v1.xlsx`, sheet 七普（年鉴）; 《中国人口普查分县资料2020》 | MIT. Cite: Dong, Du & Liu, *Mapping Evolving Population Geography in China*, working paper, 2022 |
| `yrd_fever_clinic_hospitals_2020.csv` | hhui64/wuhan2020map @ `fd2a2777`, `data_20200211030250.json`; lists published by health commissions (卫健委), 2020-01-21..23 | MIT (repository licence); the records are facts published by government bodies |

| `yrd_division_centroids_adcode2016.csv` | Vonng/adcode @ `b755d6e4`; centre points from the AMap district API (GCJ-02), 2018-02 | CC BY 4.0, "Vonng/adcode, CC BY 4.0". Used only for the members' `location` in `../region.toml` (the status board's map) |

Not used: `yrd_divisions_mca_gbt2260_2020.csv`, `yrd_towns_nbs2023.csv`,
`yrd_census_city_2010_2020.csv`.

## Members

| member | unit | code |
|---|---|---|
| shanghai | 上海市 (NBS city level 市辖区) | 310100 |
| hangzhou | 杭州市 | 330100 |
| suzhou | 苏州市 | 320500 |
| hefei | 合肥市 | 340100 |
| anji | 安吉县, a rural county of 湖州市 330500 | 330523 |

## Files

### Divisions (from `yrd_divisions_nbs2023.csv`)

Rows: the member's city row (`code` = city code) followed by the county rows
whose `city_code` is the city code, in source order. anji: only the row 330523.
Source columns used: `code`, `name`, `level`, `parent_code`.

| file | columns | changes |
|---|---|---|
| `shanghai/divisions.csv` | `code,name,level,parent` | none (level as in source: city/county) |
| `hangzhou/xzqh.csv` | `区划代码,区划名称,层级,上级代码` | level city -> `市`, county -> `区县` |
| `suzhou/divisions.csv` | `division_code,division_name,division_level,parent_code` | level city -> `2`, county -> `3` |
| `hefei/divisions.csv` | `code,name,level,parent` | none |
| `anji/divisions.csv` | `dm,mc,jb,sjdm` | none (jb = `county`) |

### Census 2020 (from `yrd_census2020_county.csv`)

Rows: `level` = county and the first four code digits equal the city's (anji:
the row 330523), in source order. Codes are the 2020 codes of the source, so
hangzhou has 330103 下城区 and 330104 江干区, suzhou has 苏州工业园区 (320571),
hefei has 340171-340173; see `UNMAPPED.md`.
Source columns used: `code`, `county`, `pop_total`, `pop_male`, `pop_female`,
`pop_urban`, `pop_rural`, `family_households`, `share_age_65_plus_pct`,
`avg_years_schooling`.

| file | columns | changes |
|---|---|---|
| `shanghai/census_2020.csv` | `code,county,pop_total,pop_male,pop_female,pop_urban,pop_rural,family_households,share_age_65_plus_pct,avg_years_schooling` | none |
| `hangzhou/census_2020.csv` | `区划代码,区县,常住人口_万人,男_万人,女_万人,城镇人口_万人,乡村人口_万人,家庭户数,65岁及以上占比,平均受教育年限` | the five population columns in 万人 with exactly 4 decimals (integer division, so value x 10000 = source); households, share, schooling unchanged |
| `suzhou/census_2020.csv` | `区县名称,总人口,男性,女性,城镇,乡村,家庭户,老年占比,受教育年限` | code column dropped (name-based file); names as published in the census |
| `hefei/census_2020.csv` | `county_code,county_name,population,male,female,urban,rural,households,aged_65_plus,schooling_years` | `aged_65_plus` = source share + `%` (e.g. `17.8%`) |
| `anji/census_2020.csv` | `dm,mc,rk,nan,nv,cz,xc,hs,lnzb,jynx` | none |

### Fever clinics (from `yrd_fever_clinic_hospitals_2020.csv`)

Rows: `city_code` equals the member's city (anji: `city` = 湖州市 and
`county` = 安吉县), in source order. hefei has **no** file: Anhui is missing
from the source. The `county` value is copied exactly as published.

| file | columns <- source | changes |
|---|---|---|
| `shanghai/fever_clinics.csv` | `区,医院名称,发布机构,发布日期` <- county, name, source, source_date | none (date `2020-01-22`); address, tel, hours, level, is_designated dropped (Shanghai published names only; all empty/false) |
| `hangzhou/fever_clinics.csv` | `district,hospital,addr,tel,hours,designated,notice_date` <- county, name, address, tel, hours, is_designated, source_date | designated `true`/`false` -> `是`/`否`; date -> `2020/01/22`; level (one row `省级`) and source dropped |
| `suzhou/fever_clinics.csv` | `county,name,address,phone,level,is_designated,date` <- county, name, address, tel, level, is_designated, source_date | is_designated -> `1`/`0`; date -> `20200122`; hours and source dropped |
| `anji/fever_clinics.csv` | `xq,yymc,dz,dh,sj,ddyy,fbrq` <- county, name, address, tel, hours, is_designated, source_date | ddyy -> `Y`/`N`; date unchanged (`2020-01-22`); level and source dropped |

### Code tables (from `yrd_divisions_nbs2023.csv`)

`shanghai/`, `hangzhou/`, `suzhou/`, `anji/district_codes.csv`: columns
`name,code`, the NBS 2023 county rows of the city (anji: 安吉县,330523), in
source order. No aliases are added; see `UNMAPPED.md` for the values that
need them. hefei has none (its data is code-based).

### Reports

- `UNMAPPED.md`: county values that do not exactly match a `district_codes.csv` name, with suggested alias targets.
- `expected.md`: facts for tests, computed directly from the source files.
"""


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------

# Files under the output directory that another script writes (not stray).
OTHER_SCRIPTS_FILES = {
    "hangzhou/ybcb.csv": "scripts/build_enrollment_data.py",
    "suzhou/insured.csv": "scripts/build_enrollment_data.py",
}

# Sections another script keeps in ORIGIN.md and expected.md, between
# "<!-- BEGIN <name>: ..." and "<!-- END <name> -->" lines (the enrollment
# section of scripts/build_enrollment_data.py).
OTHER_SECTION = re.compile(r"<!-- BEGIN (\S+?):.*?<!-- END \1 -->\n?", re.DOTALL)


def keep_other_sections(path: Path, content: str) -> str:
    """`content`, followed by the marked sections other scripts wrote into the
    existing `path`, unchanged and in their order, so that re-running this
    script does not drop them."""
    if not path.exists():
        return content
    old = path.read_text(encoding="utf-8")
    kept = [m.group(0).rstrip("\n") + "\n" for m in OTHER_SECTION.finditer(old)]
    if not kept:
        return content
    return content.rstrip("\n") + "\n\n" + "\n\n".join(kept)


def cross_check(src: Source, facts: dict[str, dict[str, int]]) -> None:
    """The builders (code-based selection) and expected.md (name-based
    selection) must agree; a mismatch means one of the selections is wrong."""
    for member, f in facts.items():
        assert len(src.fever_rows(member)) == f["fever_rows"], member
        census = src.census_counties(member)
        assert len(census) == f["census_county_rows"], member
        assert sum(int(r["pop_total"]) for r in census) == f["census_pop_total"], member
        assert len(src.code_table(member)) == f["division_county_rows"], member


# --------------------------------------------------------------------------
# Member locations (the status board's map)
# --------------------------------------------------------------------------

# Member -> the division whose centre point places it on the map. The regional
# coordination office sits in Shanghai, so it is placed at Shanghai's centre too
# (the board draws members at one point apart, with a leader line).
PLACED_AT = {**{m: code for m, (_, code) in MEMBERS.items()}, "coordination": "310100"}


def member_locations(shared: Path) -> dict[str, tuple[str, str]]:
    """Member -> (longitude, latitude) as the centroid file writes them (GCJ-02)."""
    by_code = {r["code"]: r for r in read_csv(shared / CENTROIDS_FILE)
               if r["level"] in ("province", "city", "county")}
    out = {}
    for member, code in PLACED_AT.items():
        row = by_code.get(code)
        if row is None:
            raise SystemExit(f"{CENTROIDS_FILE}: no centre point for {member}'s division {code}")
        out[member] = (row["lng_gcj02"], row["lat_gcj02"])
    return out


def place_members(region_toml: Path, locations: dict[str, tuple[str, str]]) -> str:
    """region.toml with each member's `location` line set from `locations`: written
    after the member's `kind` line (an existing `location` line is replaced). Every
    other line is kept as it is, comments included."""
    blocks = re.split(r"(?m)^(?=\[\[)", region_toml.read_text(encoding="utf-8"))
    placed = set()
    out = []
    for block in blocks:
        name = re.search(r'(?m)^name = "([^"]+)"$', block)
        if block.startswith("[[members]]") and name and name.group(1) in locations:
            member = name.group(1)
            lon, lat = locations[member]
            block = re.sub(r"(?m)^location = .*\n", "", block)
            block, n = re.subn(r'(?m)^(kind = "[^"]*"\n)',
                               lambda m: f"{m.group(1)}location = {{ lon = {lon}, lat = {lat} }}\n",
                               block, count=1)
            if n != 1:
                raise SystemExit(f"{region_toml}: member {member} has no kind line")
            placed.add(member)
        out.append(block)
    missing = sorted(set(locations) - placed)
    if missing:
        raise SystemExit(f"{region_toml}: no [[members]] entry for {', '.join(missing)}")
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", type=Path, default=DEFAULT_SHARED,
                    help=f"source data directory (default: {DEFAULT_SHARED})")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help=f"output directory (default: {DEFAULT_OUT})")
    ap.add_argument("--region", type=Path, default=DEFAULT_REGION,
                    help=f"region file whose members get their location (default: {DEFAULT_REGION})")
    args = ap.parse_args(argv)

    src = Source(args.shared)
    w = Writer(args.out)

    build_shanghai(src, w)
    build_hangzhou(src, w)
    build_suzhou(src, w)
    build_hefei(src, w)
    build_anji(src, w)

    expected_md, facts = expected_facts(args.shared)
    cross_check(src, facts)

    w.text("ORIGIN.md", keep_other_sections(args.out / "ORIGIN.md", ORIGIN_MD))
    w.text("UNMAPPED.md", unmapped_report(src))
    w.text("expected.md", keep_other_sections(args.out / "expected.md", expected_md))

    region_text = place_members(args.region, member_locations(args.shared))
    with args.region.open("w", encoding="utf-8", newline="") as f:
        f.write(region_text)
    print(f"{args.region.name}: member locations")

    for rel, n in sorted(w.written.items()):
        print(f"{rel}: {n} rows" if n >= 0 else rel)

    # Warn (never delete) about files this script did not write, e.g. a stale
    # hefei/fever_clinics.csv: they would not be reproducible.
    stray = sorted(p.relative_to(args.out).as_posix()
                   for p in args.out.rglob("*")
                   if p.is_file()
                   and p.relative_to(args.out).as_posix() not in w.written
                   and p.relative_to(args.out).as_posix() not in OTHER_SCRIPTS_FILES)
    for rel in stray:
        print(f"warning: {rel} was not written by this script", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
