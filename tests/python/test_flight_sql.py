"""Arrow Flight SQL on the office gateway's gRPC port (mutual TLS), as the regional office.

ADBC's Flight SQL driver (the Go driver behind adbc_driver_flightsql) for
statements and catalog metadata; pyarrow.flight directly for the query summary that
ends every DoGet stream as the app_metadata of a last, empty record batch.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.flight as flight
import pytest
import adbc_driver_flightsql.dbapi as flight_sql
from adbc_driver_flightsql import DatabaseOptions

from fedgate_expected import PER_MEMBER_CLINICS_SQL, PER_MEMBER_POPULATION_SQL

TIMEOUT_S = 120


@pytest.fixture(scope="module")
def flight_uri(grpc_ports) -> str:
    return f"grpc+tls://127.0.0.1:{grpc_ports['coordination']}"


@pytest.fixture(scope="module")
def adbc_conn(flight_uri, certs, office):
    # The driver takes PEM texts, not paths (Go: x509.CertPool.AppendCertsFromPEM and
    # tls.X509KeyPair over the option values).
    db_kwargs = {
        DatabaseOptions.TLS_ROOT_CERTS.value: certs.ca_pem,
        DatabaseOptions.MTLS_CERT_CHAIN.value: office.cert_pem,
        DatabaseOptions.MTLS_PRIVATE_KEY.value: office.key_pem,
        # Certificates name localhost and 127.0.0.1; the URI uses the address.
        DatabaseOptions.TLS_OVERRIDE_HOSTNAME.value: "localhost",
        DatabaseOptions.TIMEOUT_QUERY.value: str(TIMEOUT_S),
        DatabaseOptions.TIMEOUT_FETCH.value: str(TIMEOUT_S),
    }
    # autocommit: the gateway is read-only and has no transactions (without it the DB-API
    # layer warns that it cannot turn autocommit off).
    conn = flight_sql.connect(flight_uri, db_kwargs=db_kwargs, autocommit=True)
    yield conn
    conn.close()


def fetch_table(conn, sql: str) -> pa.Table:
    with conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetch_arrow_table()


def test_fever_clinics_per_member(adbc_conn, expected):
    table = fetch_table(adbc_conn, PER_MEMBER_CLINICS_SQL)
    assert table.column_names == ["member", "hospitals"]
    got = list(zip(table["member"].to_pylist(), table["hospitals"].to_pylist()))
    want = sorted(expected.fever_clinic_counts.items())
    assert got == want


def test_census_population_per_member(adbc_conn, expected):
    table = fetch_table(adbc_conn, PER_MEMBER_POPULATION_SQL)
    assert table.column_names == ["member", "population"]
    got = dict(zip(table["member"].to_pylist(), table["population"].to_pylist()))
    assert got == expected.census_population
    assert table["member"].to_pylist() == sorted(expected.census_population)


def test_catalog_metadata(adbc_conn):
    objects = adbc_conn.adbc_get_objects().read_all().to_pylist()
    catalogs = {c["catalog_name"]: c for c in objects}
    assert "yrd" in catalogs, f"catalogs: {sorted(catalogs)}"
    schemas = {s["db_schema_name"]: s for s in catalogs["yrd"]["catalog_db_schemas"] or []}
    assert "canonical" in schemas, f"schemas of yrd: {sorted(schemas)}"
    tables = {t["table_name"]: t for t in schemas["canonical"]["db_schema_tables"] or []}
    for name in ["census", "fever_clinics", "divisions", "enrollment", "underground_pipelines"]:
        assert name in tables, f"tables of yrd.canonical: {sorted(tables)}"
        assert tables[name]["table_type"] == "TABLE"
    census_columns = [c["column_name"] for c in tables["census"]["table_columns"] or []]
    assert {"county_code", "pop_total", "member"} <= set(census_columns), census_columns

    schema = adbc_conn.adbc_get_table_schema("census")
    names = schema.names
    assert "county_code" in names and "pop_total" in names and "member" in names, names
    county = schema.field("county_code").type
    assert pa.types.is_string(county) or pa.types.is_large_string(county) or pa.types.is_string_view(county), county
    assert schema.field("pop_total").type == pa.int64()


def test_parameterized_query(adbc_conn):
    """ADBC binds the values of `?` placeholders over DoPut; the gateway hands back an
    updated handle carrying them and binds them into the plan as typed values."""
    literal = fetch_table(
        adbc_conn, "SELECT county_name, pop_total FROM census WHERE county_code = '330523'"
    )
    assert literal.num_rows == 1
    with adbc_conn.cursor() as cur:
        cur.execute(
            "SELECT county_name, pop_total FROM census WHERE county_code = ?",
            parameters=("330523",),
        )
        bound = cur.fetch_arrow_table()
        assert bound.to_pylist() == literal.to_pylist()
        # A value that would be SQL if spliced in matches nothing.
        cur.execute(
            "SELECT county_name FROM census WHERE county_code = ?",
            parameters=("330523' OR '1'='1",),
        )
        assert cur.fetch_arrow_table().num_rows == 0
        cur.execute("SELECT count(*) AS n FROM census WHERE pop_total > ?", parameters=(1_000_000,))
        above = cur.fetch_arrow_table()["n"][0].as_py()
        cur.execute("SELECT count(*) AS n FROM census WHERE pop_total > ?", parameters=(0,))
        everything = cur.fetch_arrow_table()["n"][0].as_py()
        assert 0 < above < everything, (above, everything)


# --- pyarrow.flight with a hand-encoded Flight SQL command -----------------------------
#
# A Flight SQL command is a protobuf google.protobuf.Any wrapping the command message,
# sent as FlightDescriptor.cmd. Both messages here have only string/bytes fields, so
# they are a few length-delimited fields:
#   Any                   { string type_url = 1; bytes value = 2; }
#   CommandStatementQuery { string query = 1; bytes transaction_id = 2; }   (2 unused)
# A field is its key varint (field_number << 3 | wire_type; 2 = length-delimited),
# the length as a varint, then the bytes.

STATEMENT_QUERY_TYPE_URL = "type.googleapis.com/arrow.flight.protocol.sql.CommandStatementQuery"


def varint(n: int) -> bytes:
    """Protobuf base-128 varint: 7 bits a byte, low group first, high bit = more."""
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def length_delimited(field: int, data: bytes) -> bytes:
    return varint(field << 3 | 2) + varint(len(data)) + data


def statement_query_command(sql: str) -> bytes:
    query = length_delimited(1, sql.encode("utf-8"))
    return length_delimited(1, STATEMENT_QUERY_TYPE_URL.encode()) + length_delimited(2, query)


def test_protobuf_encoding():
    """The encoder against values worked out by hand from the protobuf spec."""
    assert varint(0) == b"\x00" and varint(1) == b"\x01" and varint(127) == b"\x7f"
    assert varint(128) == b"\x80\x01" and varint(300) == b"\xac\x02"
    cmd = statement_query_command("SELECT 1")
    assert cmd[:2] == b"\x0a" + bytes([len(STATEMENT_QUERY_TYPE_URL)])
    assert cmd.endswith(b"\x12\x0a\x0a\x08SELECT 1")


def test_summary_in_app_metadata(flight_uri, certs, office, expected, fever_clinic_members):
    client = flight.FlightClient(
        flight_uri,
        tls_root_certs=certs.ca_pem,
        cert_chain=office.cert_pem,
        private_key=office.key_pem,
        override_hostname="localhost",
    )
    try:
        options = flight.FlightCallOptions(timeout=TIMEOUT_S)
        descriptor = flight.FlightDescriptor.for_command(statement_query_command(PER_MEMBER_CLINICS_SQL))
        info = client.get_flight_info(descriptor, options)
        assert info.endpoints, "FlightInfo has no endpoint"
        batches, chunks = [], []
        for endpoint in info.endpoints:
            reader = client.do_get(endpoint.ticket, options)
            while True:
                try:
                    chunk = reader.read_chunk()
                except StopIteration:
                    break
                chunks.append(chunk)
                if chunk.data is not None:
                    batches.append(chunk.data)
    finally:
        client.close()

    assert chunks, "DoGet sent no record batch"
    rows = sum(b.num_rows for b in batches)
    table = pa.Table.from_batches(batches)
    got = dict(zip(table["member"].to_pylist(), table["hospitals"].to_pylist()))
    assert got == expected.fever_clinic_counts

    last = chunks[-1]
    assert last.data is None or last.data.num_rows == 0, "the summary batch must be empty"
    assert last.app_metadata is not None, "the last FlightData carries no app_metadata"
    summary = json.loads(last.app_metadata.to_pybytes())
    assert summary["partial"] is False
    assert summary["rows"] == rows == len(expected.fever_clinic_counts)
    states = {m["member"]: m["state"] for m in summary["members"]}
    for member in fever_clinic_members:
        assert states.get(member) == "ok", f"summary members: {summary['members']}"
    assert all(s == "ok" for s in states.values()), summary["members"]
