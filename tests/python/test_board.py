"""The status board in a real browser: Playwright (sync API) driving Debian's
Chromium (/usr/bin/chromium, installed by tests/python/run; Playwright's own browser
downloads are never used) against hangzhou's plain HTTP port.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import urllib.request

import pytest
from PIL import Image
from playwright.sync_api import sync_playwright

import fedgate_expected
from fedgate_expected import PER_MEMBER_CLINICS_SQL

CHROMIUM = "/usr/bin/chromium"
# As root Chromium needs --no-sandbox; the rest keep it off the network (the machine
# has none, and refused background connections slow it down).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: tests/python/run installs Debian's chromium", pytrace=False)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    context.close()
    assert not errors, f"JavaScript errors on the board: {errors}"


def count(text: str) -> int:
    digits = re.sub(r"[^0-9]", "", text)
    assert digits, f"not a number: {text!r}"
    return int(digits)


def test_board_shows_the_admission_shares(page, http_ports, demo_dir):
    """The Admission table shows both doors' shares as hangzhou's member file sets
    them (read here with tomllib, not through the gateway)."""
    member = tomllib.loads((demo_dir / "hangzhou.toml").read_text())
    limits = member["limits"]
    page.goto(f"http://127.0.0.1:{http_ports['hangzhou']}/")
    page.wait_for_selector('#admission tr[data-door="subqueries"][data-class="county"]', state="attached")

    def cells(door: str, cls: str) -> list[str]:
        row = page.locator(f'#admission tr[data-door="{door}"][data-class="{cls}"]')
        return [t.strip() for t in row.locator("td").all_text_contents()]

    for door, section, total in [("queries", "admission", limits["max_concurrent_queries"]),
                                 ("subqueries", "subquery_admission", limits["max_concurrent_subqueries"])]:
        shares = member[section]
        reserved = sum(s.get("reserved", 0) for s in shares)
        # The door's row: its slots in all, and the shared ones.
        head = cells(door, "shared")
        assert f"{total} slots" in head[0], head
        assert count(head[2]) == total - reserved, head
        for share in shares:
            row = cells(door, share["class"])
            assert row[1] == share["class"], row
            assert count(row[2]) == share.get("reserved", 0), row
            if "max_per_origin" in share:
                assert count(row[4]) == share["max_per_origin"], row
    assert page.locator("#admission meter.load").count() > 0


def test_board_runs_a_query(page, http_ports, artifacts_dir, expected):
    page.goto(f"http://127.0.0.1:{http_ports['hangzhou']}/")

    # The member table is filled from v1/status.
    for member in fedgate_expected.GATEWAY_MEMBERS:
        page.wait_for_selector(f'#members tr[data-member="{member}"]', state="attached")
    shown = page.eval_on_selector_all("#members tr[data-member]", "rows => rows.map(r => r.dataset.member)")
    assert set(fedgate_expected.GATEWAY_MEMBERS) <= set(shown), shown

    page.fill("#sql", PER_MEMBER_CLINICS_SQL)
    page.click("#run")
    # data-last-run is removed when a run starts and set ("ok" or "error") after its
    # output is rendered.
    page.wait_for_selector("body[data-last-run]", state="attached")
    outcome = page.get_attribute("body", "data-last-run")
    assert outcome == "ok", f"the query failed on the board: {page.inner_text('#error')!r}"

    # textContent, not innerText: the board's CSS shows headers in capitals.
    headers = [t.strip() for t in page.locator("#result thead th").all_text_contents()]
    assert headers == ["member", "hospitals"]
    rows = []
    for tr in page.locator("#result tbody tr").all():
        cells = [t.strip() for t in tr.locator("td").all_text_contents()]
        rows.append((cells[0], count(cells[1])))
    assert rows == sorted(expected.fever_clinic_counts.items())

    states = page.eval_on_selector_all(
        "#summary tr[data-member]", "rows => rows.map(r => [r.dataset.member, r.dataset.state])")
    assert states, "the board shows no member summary"
    assert {m for m, _ in states} >= set(fedgate_expected.FEVER_CLINIC_MEMBERS), states
    assert all(state == "ok" for _, state in states), states

    shot = artifacts_dir / "status-board.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 0


def test_board_shows_and_verifies_the_members_own_audit_log(page, http_ports, demo_dir):
    """Hangzhou's loopback port acts as Hangzhou itself, so its board shows Hangzhou's
    audit log; the records shown are the last ones of the file (read here directly),
    and the Verify button reports the chain intact."""
    page.goto(f"http://127.0.0.1:{http_ports['hangzhou']}/")
    page.wait_for_selector("#audit-records tr[data-seq]", state="attached")
    shown = page.eval_on_selector_all("#audit-records tr[data-seq]", "rows => rows.map(r => Number(r.dataset.seq))")
    log = sorted(demo_dir.rglob("hangzhou.log"))
    assert log, f"no audit log of hangzhou under {demo_dir}"
    seqs = [json.loads(line)["seq"] for line in log[0].read_text().splitlines() if line.endswith("}")]
    assert shown and set(shown) <= set(seqs), (shown, seqs[-5:])
    assert shown == sorted(shown), shown
    page.click("#audit-verify")
    page.wait_for_selector("#audit-verdict[data-state]", state="attached")
    assert page.get_attribute("#audit-verdict", "data-state") == "intact", page.inner_text("#audit-verdict")
    assert "records verify" in page.inner_text("#audit-verdict")


# The map's colours for each state (frontend/pictures.rs), as RGB.
STATE_COLOURS = {
    "this gateway": (0x25, 0x63, 0xEB),
    "up": (0x16, 0xA3, 0x4A),
    "degraded": (0xD9, 0x77, 0x06),
    "down": (0xDC, 0x26, 0x26),
    "not asked yet": (0x9C, 0xA3, 0xAF),
}


def get_json(url: str):
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=30) as r:
        return json.loads(r.read())


def test_board_draws_the_region_map_and_each_members_last_hour(page, http_ports, artifacts_dir, demo_dir):
    """The map places every member with a location in region.toml (read here with
    tomllib) by its longitude and latitude and colours it by the state /v1/status
    reports; the charts count the sub-queries /v1/history counts; and the pixels of
    the screenshot at each member's point have its state's colour."""
    base = f"http://127.0.0.1:{http_ports['hangzhou']}"
    region = tomllib.loads((demo_dir / "region.toml").read_text())
    located = {m["name"]: m["location"] for m in region["members"] if "location" in m}
    assert len(located) == len(region["members"]), "the sample region places every member"

    # Queries that reach every member serving data (census is served by all of them).
    for sql in ["SELECT member, count(*) AS n FROM census GROUP BY member", PER_MEMBER_CLINICS_SQL]:
        req = urllib.request.Request(f"{base}/v1/query", data=json.dumps({"sql": sql}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=60) as r:
            assert r.status == 200

    page.goto(f"{base}/")
    page.wait_for_selector('#map svg g[data-member="hefei"][data-state="up"]', state="attached")
    page.wait_for_selector('#charts svg g[data-member="hefei"]:not([data-calls="0"])', state="attached")
    status = get_json(f"{base}/v1/status")
    history = get_json(f"{base}/v1/history")

    drawn = page.eval_on_selector_all("#map svg g[data-member]", """gs => gs.map(g => {
        const c = [...g.querySelectorAll('circle')].pop();
        return [g.dataset.member, g.dataset.state, Number(c.getAttribute('cx')), Number(c.getAttribute('cy'))];
    })""")
    at = {m: (x, y) for m, _, x, y in drawn}
    assert set(at) == set(located), drawn
    seen = {m["name"]: m["seen"] for m in status["members"]}
    assert {m: s for m, s, _, _ in drawn} == {m: seen[m] for m in located}, (drawn, seen)
    assert seen["hangzhou"] == "this gateway" and seen["hefei"] == "up", seen

    # East is to the right and north is up. The office shares Shanghai's point and is
    # drawn beside it, so it is left out of the ordering.
    placed = [m for m in located if m != "coordination"]
    by_lon = sorted(placed, key=lambda m: located[m]["lon"])
    assert by_lon == sorted(placed, key=lambda m: at[m][0]), (by_lon, at)
    by_lat = sorted(placed, key=lambda m: -located[m]["lat"])
    assert by_lat == sorted(placed, key=lambda m: at[m][1]), (by_lat, at)
    sh, co = at["shanghai"], at["coordination"]
    assert ((sh[0] - co[0]) ** 2 + (sh[1] - co[1]) ** 2) ** 0.5 >= 18, at

    # The charts: each member's calls in the hour, as /v1/history counts them.
    charted = dict(page.eval_on_selector_all(
        "#charts svg g[data-member]", "gs => gs.map(g => [g.dataset.member, Number(g.dataset.calls)])"))
    counted = {m: sum(x["calls"] for x in minutes) for m, minutes in history["members"].items()}
    assert charted == {m: counted.get(m, 0) for m in charted}, (charted, counted)
    assert charted["hefei"] >= 1 and charted["shanghai"] >= 2, charted
    bars = page.eval_on_selector_all(
        '#charts svg g[data-member="shanghai"] rect[data-calls]', "rs => rs.map(r => Number(r.dataset.calls))")
    assert sum(bars) == charted["shanghai"], bars

    # The screenshot: the pixel at each member's point has its state's colour.
    shot = artifacts_dir / "status-board-map.png"
    page.locator("#map svg").screenshot(path=str(shot))
    svg_box = page.locator("#map svg").bounding_box()
    image = Image.open(shot).convert("RGB")
    for member, state, _, _ in drawn:
        circle = page.locator(f'#map svg g[data-member="{member}"] circle').last.bounding_box()
        x = round(circle["x"] + circle["width"] / 2 - svg_box["x"])
        y = round(circle["y"] + circle["height"] / 2 - svg_box["y"])
        pixel = image.getpixel((x, y))
        want = STATE_COLOURS[state]
        assert all(abs(a - b) <= 24 for a, b in zip(pixel, want)), (member, state, pixel, want)
    page.locator("#pictures").screenshot(path=str(artifacts_dir / "status-board-pictures.png"))
