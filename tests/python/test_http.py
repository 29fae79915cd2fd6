"""The JSON/HTTP API with urllib: anji's plain HTTP port (the caller is the county
itself, fedgate://yrd/county/anji) and the mutual-TLS HTTPS ports of shanghai and of
the office's own gateway (the caller is whoever the client certificate names: here
the regional office).
"""

from __future__ import annotations

import http.client
import json
import re
import ssl
import urllib.error
import urllib.request

import pytest

import fedgate_expected
from fedgate_expected import ENROLLED_ID, PER_MEMBER_CLINICS_SQL

TIMEOUT_S = 120
NEAR_COLUMNS = ["member", "county_code", "hospital_name", "address", "phone", "is_designated", "in_county"]
# Fields of an enrollment record, none of which a verify-only answer may carry.
ENROLLMENT_FIELDS = ["id_number", "name", "phone", "county_code", "sex", "birth_year",
                     "scheme", "status", "enrolled_on"]


class Response:
    def __init__(self, status: int, headers, body: bytes):
        self.status, self.headers, self.body = status, headers, body

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")

    def json(self):
        try:
            return json.loads(self.body)
        except ValueError:
            raise AssertionError(f"HTTP {self.status}: not JSON: {self.body[:500]!r}") from None


def opener(context: ssl.SSLContext | None = None) -> urllib.request.OpenerDirector:
    # No proxies: every address here is on this machine, whatever *_proxy says.
    handlers = [urllib.request.ProxyHandler({})]
    if context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=context))
    return urllib.request.build_opener(*handlers)


_NONE = object()


def call(url: str, body=_NONE, *, raw: bytes | None = None, context=None) -> Response:
    """GET (no body) or POST (a JSON body, or raw bytes); 4xx/5xx are returned, not raised."""
    headers = {"Accept": "application/json"}
    data = raw
    if body is not _NONE:
        data = json.dumps(body).encode()
    if data is not None:
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url, data=data, headers=headers,
                                 method="POST" if data is not None else "GET")
    try:
        with opener(context).open(req, timeout=TIMEOUT_S) as resp:
            return Response(resp.status, resp.headers, resp.read())
    except urllib.error.HTTPError as e:
        return Response(e.code, e.headers, e.read())


@pytest.fixture(scope="module")
def anji(http_ports) -> str:
    return f"http://127.0.0.1:{http_ports['anji']}"


@pytest.fixture(scope="module")
def shanghai_https(http_ports) -> str:
    return f"https://127.0.0.1:{http_ports['shanghai']}"


@pytest.fixture(scope="module")
def office_https(http_ports) -> str:
    """The office's own gateway, which speaks for it to every member."""
    return f"https://127.0.0.1:{http_ports['coordination']}"


def ok_json(resp: Response):
    assert resp.status == 200, f"HTTP {resp.status}: {resp.body[:1000]!r}"
    return resp.json()


def column_names(body) -> list[str]:
    return [c["name"] for c in body["columns"]]


def assert_summary_ok(summary, members):
    assert summary["partial"] is False, summary
    states = {m["member"]: m["state"] for m in summary["members"]}
    for member in members:
        assert states.get(member) == "ok", f"summary members: {summary['members']}"
    assert all(s == "ok" for s in states.values()), summary["members"]


# --- anji: plain HTTP, caller fedgate://yrd/county/anji -----------------------------------

def test_healthz(anji):
    resp = call(f"{anji}/healthz")
    assert resp.status == 200
    assert resp.text == "ok\n"


def test_fever_clinics_near_anji(anji, fever_clinic_members):
    county = fedgate_expected.ANJI_COUNTY  # 安吉县, Huzhou prefecture (3305)
    body = ok_json(call(f"{anji}/v1/services/fever_clinics_near", {"county_code": county}))
    assert body.get("service") == "fever_clinics_near"
    assert column_names(body) == NEAR_COLUMNS
    # arrow_json leaves NULL values out of a row object: a missing key is NULL.
    blank = lambda v: None if v == "" else v  # noqa: E731
    got = [
        (r.get("member"), r.get("county_code"), r.get("hospital_name"), blank(r.get("address")),
         blank(r.get("phone")), r.get("is_designated"), r.get("in_county"))
        for r in body["rows"]
    ]
    want = [
        (r.member, r.county_code, r.hospital_name, r.address, r.phone, r.is_designated, r.in_county)
        for r in fedgate_expected.fever_clinics_near(county)
    ]
    assert want, "the data has no fever clinic in Huzhou prefecture"
    assert got == want
    for row in got:
        assert row[1].startswith(county[:4])
        assert row[6] is (row[1] == county)
    assert body["summary"]["rows"] == len(want)
    assert_summary_ok(body["summary"], fever_clinic_members)


@pytest.mark.parametrize(
    "payload, names",
    [
        pytest.param({"county_code": 330523}, ["county_code"], id="wrong-type"),
        pytest.param({}, ["county_code"], id="missing"),
        pytest.param({"county_code": "330523", "foo": 1}, ["foo"], id="extra"),
        pytest.param([1], [], id="not-an-object"),
    ],
)
def test_bad_parameters(anji, payload, names):
    resp = call(f"{anji}/v1/services/fever_clinics_near", payload)
    assert resp.status == 400, f"HTTP {resp.status}: {resp.body[:500]!r}"
    error = resp.json()["error"]
    assert error["code"] == "invalid_argument", error
    for name in names:
        assert name in error["message"], error


def test_unknown_service(anji):
    resp = call(f"{anji}/v1/services/no_such_service", {"county_code": "330523"})
    assert resp.status == 404, f"HTTP {resp.status}: {resp.body[:500]!r}"
    assert resp.json()["error"]["code"] == "not_found"


def test_services_listed(anji):
    services = {s["name"]: s for s in ok_json(call(f"{anji}/v1/services"))["services"]}
    assert {"fever_clinics_near", "enrollment_check"} <= set(services), sorted(services)
    params = {p["name"]: p["type"] for p in services["fever_clinics_near"]["params"]}
    assert params == {"county_code": "utf8"}


@pytest.mark.parametrize("gateway", ["anji", "hangzhou"])  # a county and a city caller
def test_enrollment_check_is_verify_only(http_ports, gateway):
    url = f"http://127.0.0.1:{http_ports[gateway]}/v1/services/enrollment_check"
    body = ok_json(call(url, {"id_number": ENROLLED_ID}))
    assert sorted(column_names(body)) == ["enrolled", "member"], body["columns"]
    for row in body["rows"]:
        assert set(row) <= {"member", "enrolled"}, row
        assert not set(row) & set(ENROLLMENT_FIELDS), row
    enrolled = {r["member"]: r.get("enrolled") for r in body["rows"]}
    want = fedgate_expected.enrollment_check(ENROLLED_ID)  # {'hangzhou': 1, 'suzhou': 0}
    assert enrolled.get("hangzhou") == 1, body["rows"]
    # One row per member serving enrollment; a member where the ID is not enrolled
    # may answer 0 or no row, never 1.
    assert set(enrolled) <= set(fedgate_expected.ENROLLMENT_MEMBERS), enrolled
    for member, flag in want.items():
        assert enrolled.get(member, 0) == flag, (member, body["rows"])
    assert_summary_ok(body["summary"], fedgate_expected.ENROLLMENT_MEMBERS)


def test_metrics_after_calls(anji):
    # A call of our own first, so the counters exist whatever ran before.
    ok_json(call(f"{anji}/v1/services/fever_clinics_near", {"county_code": fedgate_expected.ANJI_COUNTY}))
    resp = call(f"{anji}/metrics")
    assert resp.status == 200
    text = resp.text
    for name in ["fedgate_queries_total", "fedgate_member_call_duration_seconds"]:
        assert re.search(rf"^{name}(_bucket|_sum|_count)?[{{ ]", text, re.M), f"{name} not in /metrics"


# --- shanghai: HTTPS with mutual TLS ----------------------------------------------------

@pytest.fixture(scope="module")
def office_tls(certs, office) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs.ca_path))
    ctx.load_cert_chain(str(office.cert_path), str(office.key_path))
    return ctx


def test_mtls_query(office_https, office_tls, expected, fever_clinic_members):
    body = ok_json(call(f"{office_https}/v1/query", {"sql": PER_MEMBER_CLINICS_SQL}, context=office_tls))
    assert column_names(body) == ["member", "hospitals"]
    got = [(r["member"], r["hospitals"]) for r in body["rows"]]
    assert got == sorted(expected.fever_clinic_counts.items())
    assert_summary_ok(body["summary"], fever_clinic_members)


def test_mtls_caller_is_the_certificate(shanghai_https, office_tls):
    status = ok_json(call(f"{shanghai_https}/v1/status", context=office_tls))
    assert status["member"] == "shanghai"
    assert status["caller"] == "fedgate://yrd/office/coordination"


def test_status_shows_a_caller_only_its_own_queries(shanghai_https, office_tls, certs):
    def tls(name: str) -> ssl.SSLContext:
        who = certs.identity(name)
        ctx = ssl.create_default_context(cafile=str(certs.ca_path))
        ctx.load_cert_chain(str(who.cert_path), str(who.key_path))
        return ctx

    office_uri = "fedgate://yrd/office/coordination"
    # Queries of Shanghai's own data: for anything else Shanghai's gateway would need
    # each caller's own gateway to vouch for it.
    own = "SELECT count(*) AS n FROM {} WHERE member = 'shanghai'"
    ok_json(call(f"{shanghai_https}/v1/query", {"sql": own.format("divisions")}, context=office_tls))
    ok_json(call(f"{shanghai_https}/v1/query", {"sql": own.format("census")}, context=tls("anji")))
    mine = ok_json(call(f"{shanghai_https}/v1/status", context=office_tls))
    origins = {r["origin"] for r in mine["recent"]}
    assert origins == {office_uri}, origins
    assert all(m["last_error"] is None for m in mine["members"])
    # The member's own identity (its operators) sees every caller's queries.
    everyone = ok_json(call(f"{shanghai_https}/v1/status", context=tls("shanghai")))
    origins = {r["origin"] for r in everyone["recent"]}
    assert {office_uri, "fedgate://yrd/county/anji"} <= origins, origins


def test_mtls_refuses_without_client_certificate(shanghai_https, certs):
    ctx = ssl.create_default_context(cafile=str(certs.ca_path))  # trusts the server, no client cert
    with pytest.raises((OSError, http.client.HTTPException)) as err:
        # With TLS 1.3 the client's handshake ends before the server has checked the
        # client's certificate; the refusal (an alert, or a reset) then arrives when the
        # response is read: ssl.SSLError, ConnectionResetError or RemoteDisconnected.
        call(f"{shanghai_https}/v1/query", {"sql": "SELECT 1"}, context=ctx)
    assert not isinstance(err.value, urllib.error.HTTPError), "answered over HTTP without a client certificate"


# --- what keeps web pages a browser visits from using the port ---------------------------

def test_a_body_that_is_not_declared_json_is_refused(anji):
    """A cross-site form or no-cors fetch can only send form or text bodies; they
    are refused, so no query runs on a web page's behalf."""
    county = fedgate_expected.ANJI_COUNTY
    req = urllib.request.Request(
        f"{anji}/v1/services/fever_clinics_near",
        data=json.dumps({"county_code": county}).encode(),
        headers={"Content-Type": "text/plain"},
        method="POST",
    )
    try:
        with opener().open(req, timeout=TIMEOUT_S) as resp:
            raise AssertionError(f"HTTP {resp.status}: a text/plain body was served")
    except urllib.error.HTTPError as e:
        assert e.code == 415, e.code
        body = json.loads(e.read())
        assert "application/json" in body["error"]["message"], body


def test_the_plain_port_answers_only_loopback_names(anji, http_ports):
    """DNS rebinding: a page at attacker.example resolved to 127.0.0.1 sends its
    own name as Host; the plain port refuses it instead of acting as the member."""
    for host, served in [("attacker.example", False), ("localhost", True),
                         ("127.0.0.1", True)]:
        conn = http.client.HTTPConnection("127.0.0.1", http_ports["anji"], timeout=TIMEOUT_S)
        try:
            conn.request("GET", "/v1/status", headers={"Host": f"{host}:{http_ports['anji']}"})
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
        if served:
            assert resp.status == 200, (host, resp.status, body[:300])
        else:
            assert resp.status == 421, (host, resp.status, body[:300])
            assert json.loads(body)["error"]["code"] == "permission_denied"
