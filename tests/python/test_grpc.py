"""fedgate's own gRPC API (proto/fedgate/v1/fedgate.proto) with grpcio, as the
regional office on its own gateway's port (mutual TLS).

The proto is compiled with grpc_tools.protoc at session start, so the tests use the
repository's proto as it is, not a copy.
"""

from __future__ import annotations

import importlib
import importlib.resources
import struct
import sys

import grpc
import pyarrow as pa
import pyarrow.ipc
import pytest
from grpc_tools import protoc

import fedgate_expected
from fedgate_expected import PER_MEMBER_CLINICS_SQL

TIMEOUT_S = 120
MEMBER_STATE_OK = 1  # fedgate.v1.MemberState.MEMBER_STATE_OK


@pytest.fixture(scope="session")
def fedgate_proto(repo, tmp_path_factory):
    """(fedgate_pb2, fedgate_pb2_grpc) generated from proto/fedgate/v1/fedgate.proto."""
    out = tmp_path_factory.mktemp("fedgate_proto")
    include = importlib.resources.files("grpc_tools") / "_proto"
    rc = protoc.main([
        "grpc_tools.protoc",
        f"-I{repo / 'proto'}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        str(repo / "proto" / "fedgate" / "v1" / "fedgate.proto"),
    ])
    assert rc == 0, f"grpc_tools.protoc failed on proto/fedgate/v1/fedgate.proto (exit {rc})"
    sys.path.insert(0, str(out))
    try:
        pb2 = importlib.import_module("fedgate.v1.fedgate_pb2")
        pb2_grpc = importlib.import_module("fedgate.v1.fedgate_pb2_grpc")
    finally:
        sys.path.remove(str(out))
    return pb2, pb2_grpc


@pytest.fixture(scope="module")
def channel(grpc_ports, certs, office):
    creds = grpc.ssl_channel_credentials(
        root_certificates=certs.ca_pem.encode(),
        private_key=office.key_pem.encode(),
        certificate_chain=office.cert_pem.encode(),
    )
    ch = grpc.secure_channel(
        f"127.0.0.1:{grpc_ports['coordination']}",
        creds,
        # The server certificates name localhost (and 127.0.0.1); grpc's TLS checks the
        # name against the target host unless told which name to expect.
        options=[("grpc.ssl_target_name_override", "localhost")],
    )
    yield ch
    ch.close()


@pytest.fixture(scope="module")
def federation(fedgate_proto, channel):
    _, pb2_grpc = fedgate_proto
    return pb2_grpc.FederationStub(channel)


def ipc_stream(chunks) -> bytes:
    """An Arrow IPC stream from (header, body) pairs, as Flight's FlightData carry them.

    Each message in the stream format (Arrow columnar spec, "Encapsulated message
    format"): 0xFFFFFFFF continuation marker, int32 little-endian length of the
    flatbuffer header including its padding to a multiple of 8, the header, zero
    padding, then the body. The stream ends with the marker and a zero length.
    """
    out = bytearray()
    for header, body in chunks:
        padded = (len(header) + 7) // 8 * 8
        out += b"\xff\xff\xff\xff" + struct.pack("<i", padded)
        out += header + b"\x00" * (padded - len(header))
        out += body
    out += b"\xff\xff\xff\xff\x00\x00\x00\x00"
    return bytes(out)


def read_answer(responses):
    """(table, summary) from a Query/Invoke response stream; the summary comes last."""
    chunks, summaries, after_summary = [], [], []
    for resp in responses:
        kind = resp.WhichOneof("payload")
        if summaries:
            after_summary.append(kind)
        if kind == "arrow":
            chunks.append((resp.arrow.header, resp.arrow.body))
        elif kind == "summary":
            summaries.append(resp.summary)
        # "progress" messages (only sent when asked for) are ignored.
    assert len(summaries) == 1, f"expected exactly one summary, got {len(summaries)}"
    assert not after_summary, f"messages after the summary: {after_summary}"
    assert chunks, "no Arrow message (the first must be the schema)"
    table = pa.ipc.open_stream(ipc_stream(chunks)).read_all()
    return table, summaries[0]


def check_summary(summary, table, members):
    assert summary.partial is False
    assert summary.rows == table.num_rows
    states = {m.member: m.state for m in summary.members}
    for member in members:
        assert states.get(member) == MEMBER_STATE_OK, f"summary members: {summary.members}"
    assert all(s == MEMBER_STATE_OK for s in states.values()), summary.members


def test_query_fever_clinics_per_member(fedgate_proto, federation, expected, fever_clinic_members):
    pb2, _ = fedgate_proto
    request = pb2.QueryRequest(sql=PER_MEMBER_CLINICS_SQL, timeout_ms=TIMEOUT_S * 1000)
    table, summary = read_answer(federation.Query(request, timeout=TIMEOUT_S))
    assert table.column_names == ["member", "hospitals"]
    got = list(zip(table["member"].to_pylist(), table["hospitals"].to_pylist()))
    assert got == sorted(expected.fever_clinic_counts.items())
    check_summary(summary, table, fever_clinic_members)


def near_rows(table: pa.Table):
    """Rows of a fever_clinics_near answer as comparable tuples (empty text = NULL)."""
    blank = lambda v: None if v == "" else v  # noqa: E731
    return [
        (r["member"], r["county_code"], r["hospital_name"], blank(r["address"]), blank(r["phone"]),
         r["is_designated"], r["in_county"])
        for r in table.to_pylist()
    ]


def expected_near_rows(county_code: str):
    return [
        (r.member, r.county_code, r.hospital_name, r.address, r.phone, r.is_designated, r.in_county)
        for r in fedgate_expected.fever_clinics_near(county_code)
    ]


NEAR_COLUMNS = ["member", "county_code", "hospital_name", "address", "phone", "is_designated", "in_county"]


def test_invoke_fever_clinics_near(fedgate_proto, federation, fever_clinic_members):
    pb2, _ = fedgate_proto
    if not hasattr(pb2, "InvokeRequest") or not hasattr(federation, "Invoke"):
        pytest.fail("proto/fedgate/v1/fedgate.proto has no Federation.Invoke / InvokeRequest", pytrace=False)
    county = fedgate_expected.HANGZHOU_XIHU  # 西湖区, Hangzhou
    request = pb2.InvokeRequest(
        service="fever_clinics_near",
        params={"county_code": pb2.ParamValue(text=county)},
        timeout_ms=TIMEOUT_S * 1000,
    )
    table, summary = read_answer(federation.Invoke(request, timeout=TIMEOUT_S))
    assert table.column_names == NEAR_COLUMNS
    got, want = near_rows(table), expected_near_rows(county)
    # Order: in_county DESC, county_code, hospital_name (no two rows tie on these).
    assert [(not r[6], r[1], r[2]) for r in got] == [(not r[6], r[1], r[2]) for r in want]
    assert got == want
    assert any(r[6] for r in want) and not all(r[6] for r in want)  # both kinds of row
    assert all(r[1].startswith(county[:4]) for r in got)
    check_summary(summary, table, fever_clinic_members)


def test_invoke_rejects_a_bad_parameter(fedgate_proto, federation):
    pb2, _ = fedgate_proto
    if not hasattr(pb2, "InvokeRequest"):
        pytest.fail("proto/fedgate/v1/fedgate.proto has no InvokeRequest", pytrace=False)
    request = pb2.InvokeRequest(service="fever_clinics_near",
                                params={"county_code": pb2.ParamValue(int64=330106)})
    with pytest.raises(grpc.RpcError) as err:
        list(federation.Invoke(request, timeout=TIMEOUT_S))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "county_code" in err.value.details()


def test_reflection_lists_federation(channel, fedgate_proto):
    from google.protobuf import descriptor_pool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    db = ProtoReflectionDescriptorDatabase(channel)  # grpc.reflection.v1alpha
    services = db.get_services()
    assert "fedgate.v1.Federation" in services, services
    pool = descriptor_pool.DescriptorPool(db)
    federation = pool.FindServiceByName("fedgate.v1.Federation")
    methods = {m.name for m in federation.methods}
    assert {"Query", "Describe", "Explain", "Invoke"} <= methods, methods


def test_reflection_v1_lists_federation(channel):
    """grpc.reflection.v1 has the same messages as v1alpha under another service name,
    so v1alpha's generated messages serve to call it."""
    from grpc_reflection.v1alpha import reflection_pb2

    call = channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    responses = list(call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                          timeout=TIMEOUT_S))
    assert len(responses) == 1
    names = [s.name for s in responses[0].list_services_response.service]
    assert "fedgate.v1.Federation" in names, names


def test_health_serving(channel):
    """grpc.health.v1.Health/Check, hand-encoded: an empty HealthCheckRequest (service
    "" = the whole server) and HealthCheckResponse{status = 1 SERVING} = 08 01."""
    check = channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    assert check(b"", timeout=TIMEOUT_S) == b"\x08\x01"


def test_another_gateway_speaks_for_the_office_only_with_its_gateways_assertion(
        fedgate_proto, federation, grpc_ports, http_ports, certs, office, fever_clinic_members):
    """Through Shanghai's gateway, the other members answer the office only when the
    office's own gateway vouched for the query (Federation.Vouch); the assertion goes
    as gRPC binary metadata or, on the JSON API, as a base64 header."""
    import base64
    import ssl
    import urllib.request
    import json

    pb2, pb2_grpc = fedgate_proto
    sql = PER_MEMBER_CLINICS_SQL
    creds = grpc.ssl_channel_credentials(
        root_certificates=certs.ca_pem.encode(),
        private_key=office.key_pem.encode(),
        certificate_chain=office.cert_pem.encode(),
    )
    with grpc.secure_channel(f"127.0.0.1:{grpc_ports['shanghai']}", creds,
                             options=[("grpc.ssl_target_name_override", "localhost")]) as ch:
        shanghai = pb2_grpc.FederationStub(ch)
        # Without an assertion: Shanghai answers for itself, the others refuse.
        req = pb2.QueryRequest(sql=sql, allow_partial=True)
        _, summary = read_answer(shanghai.Query(req, timeout=TIMEOUT_S))
        states = {m.member: m for m in summary.members}
        assert states["shanghai"].state == MEMBER_STATE_OK
        refused = [m for name, m in states.items() if name != "shanghai"]
        assert refused and all("without an origin assertion" in m.reason for m in refused), refused
        # With the office gateway's assertion in the metadata: every member answers.
        vouched = federation.Vouch(pb2.VouchRequest(gateway="shanghai", sql=sql), timeout=TIMEOUT_S)
        assert vouched.covers.datasets == ["fever_clinics"]
        assert vouched.covers.via == "fedgate://yrd/city/shanghai"
        table, summary = read_answer(shanghai.Query(
            pb2.QueryRequest(sql=sql), timeout=TIMEOUT_S,
            metadata=[("fedgate-origin-assertion-bin", vouched.assertion)]))
        check_summary(summary, table, fever_clinic_members)
        # Presented again, for a second query: refused as a replay.
        with pytest.raises(grpc.RpcError) as err:
            list(shanghai.Query(pb2.QueryRequest(sql=sql), timeout=TIMEOUT_S,
                                metadata=[("fedgate-origin-assertion-bin", vouched.assertion)]))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "already used" in err.value.details()

    # The JSON API on Shanghai's HTTPS port takes it as a base64 header.
    fresh = federation.Vouch(pb2.VouchRequest(gateway="shanghai", sql=sql), timeout=TIMEOUT_S)
    ctx = ssl.create_default_context(cafile=str(certs.ca_path))
    ctx.load_cert_chain(str(office.cert_path), str(office.key_path))
    req = urllib.request.Request(
        f"https://127.0.0.1:{http_ports['shanghai']}/v1/query",
        data=json.dumps({"sql": sql}).encode(),
        headers={"Content-Type": "application/json",
                 "fedgate-origin-assertion": base64.b64encode(fresh.assertion).decode()},
        method="POST")
    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=ctx))
    with opener.open(req, timeout=TIMEOUT_S) as resp:
        body = json.loads(resp.read())
    states = {m["member"]: m["state"] for m in body["summary"]["members"]}
    assert set(fever_clinic_members) <= set(states), states
    assert all(s == "ok" for s in states.values()), states
