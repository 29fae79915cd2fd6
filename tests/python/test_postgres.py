"""The PostgreSQL port with the clients offices use: psql (Debian's), psycopg,
SQLAlchemy and the PostgreSQL JDBC driver (Debian's, on OpenJDK), each over TLS with
the office's client certificate (sslmode=verify-full), against the sample region.

Expected values come from fedgate_expected (plain Python over the members' files)."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa

import fedgate_expected

POSTGRES_OFFSET = 2000
ANJI = "330523"


@pytest.fixture(scope="session")
def pg_port(grpc_ports) -> int:
    """The office gateway's PostgreSQL port (gRPC port + 2000 under --port-base)."""
    return grpc_ports["coordination"] + POSTGRES_OFFSET


@pytest.fixture(scope="session")
def conninfo(pg_port, certs, office) -> str:
    return (
        f"host=localhost port={pg_port} dbname=yrd user=office sslmode=verify-full "
        f"sslrootcert={certs.ca_path} sslcert={office.cert_path} sslkey={office.key_path}"
    )


def anji_population(expected) -> int:
    """Anji is one county: its member total is the county's population."""
    return expected.census_population["anji"]


def census_rows() -> int:
    """One census row per county line of every member's file."""
    return sum(len(fedgate_expected.read_csv(spec[0]))
               for spec in fedgate_expected.CENSUS_SPECS.values())


def test_psql_lists_describes_and_queries(conninfo, expected):
    def psql(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["psql", conninfo, "-X", "-v", "ON_ERROR_STOP=1", *args],
                              capture_output=True, text=True, timeout=60)

    r = psql("-c", r"\dt")
    assert r.returncode == 0, r.stderr
    for name in ["census", "divisions", "enrollment", "fever_clinics", "underground_pipelines"]:
        assert f"canonical | {name}" in r.stdout, r.stdout
    r = psql("-c", r"\d census")
    assert r.returncode == 0, r.stderr
    assert "pop_total" in r.stdout and "bigint" in r.stdout, r.stdout
    r = psql("-A", "-t", "-c", f"SELECT pop_total FROM census WHERE county_code = '{ANJI}'")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(anji_population(expected))
    # The answer's per-member summary is a notice psql prints.
    assert "NOTICE:  fedgate answer: 1 rows" in r.stderr, r.stderr
    # A refused query: psql reports the server's message and exits non-zero.
    r = psql("-c", "SELECT * FROM no_such_dataset")
    assert r.returncode != 0
    assert "unknown dataset" in r.stderr, r.stderr


def test_psycopg_binds_parameters_and_reports_sqlstates(conninfo, expected):
    # A notice's fields are read in the handler: the result they live in is freed after.
    notices: list[tuple[str, str]] = []
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.add_notice_handler(lambda d: notices.append((d.severity, d.message_primary)))
        row = conn.execute("SELECT county_name, pop_total FROM census WHERE county_code = %s",
                           (ANJI,)).fetchone()
        assert row[1] == anji_population(expected)
        # A bound value is a value: SQL in it matches nothing.
        assert conn.execute("SELECT count(*) FROM census WHERE county_code = %s",
                            (f"{ANJI}' OR '1'='1",)).fetchone() == (0,)
        assert notices and notices[-1][0] == "NOTICE", notices
        assert notices[-1][1].startswith("fedgate answer: 1 rows"), notices
        conn.execute("SET fedgate.purpose = 'census review'")
        assert conn.execute("SHOW fedgate.purpose").fetchone() == ("census review",)
        with pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute("SELECT * FROM no_such_dataset")
        with pytest.raises(psycopg.errors.UndefinedColumn):
            conn.execute("SELECT no_such_column FROM census")
        with pytest.raises(psycopg.errors.SyntaxError):
            conn.execute("SELEC 1")
        # The catalog, as tools read it.
        tables = [r[0] for r in conn.execute(
            "SELECT table_name FROM information_schema.tables "
            "WHERE table_schema = 'canonical' ORDER BY 1")]
        assert "census" in tables and "enrollment" in tables, tables
    # Without autocommit (psycopg's default) queries run inside BEGIN/COMMIT.
    with psycopg.connect(conninfo) as conn:
        n = conn.execute("SELECT count(*) FROM yrd.canonical.census").fetchone()[0]
        assert n == census_rows()
        conn.commit()


def test_sqlalchemy_connects_lists_tables_and_queries(pg_port, certs, office, expected):
    url = sa.engine.URL.create(
        "postgresql+psycopg", username="office", host="localhost", port=pg_port, database="yrd",
        query={"sslmode": "verify-full", "sslrootcert": str(certs.ca_path),
               "sslcert": str(office.cert_path), "sslkey": str(office.key_path)})
    engine = sa.create_engine(url)
    with engine.connect() as c:
        got = c.execute(sa.text("SELECT pop_total FROM census WHERE county_code = :c"),
                        {"c": ANJI}).scalar_one()
        assert got == anji_population(expected)
        assert sa.inspect(c).get_schema_names() == ["canonical"]
        names = sa.inspect(c).get_table_names(schema="canonical")
        assert sorted(names) == ["census", "divisions", "enrollment", "fever_clinics",
                                 "underground_pipelines"]
        census = sa.Table("census", sa.MetaData(), sa.Column("member", sa.Text),
                          sa.Column("pop_total", sa.BigInteger), schema="canonical")
        per_member = dict(c.execute(
            sa.select(census.c.member, sa.func.count()).group_by(census.c.member)).all())
        assert sum(per_member.values()) == census_rows()


def test_the_jdbc_driver_reads_metadata_binds_fetches_in_pieces(pg_port, certs, office, tmp_path,
                                                               expected, repo):
    jar = Path("/usr/share/java/postgresql.jar")
    assert jar.is_file(), "tests/python/run installs Debian's libpostgresql-jdbc-java"
    # The driver reads a client key as PKCS#8 DER: the same key, without its PEM armour.
    pem = office.key_pem
    assert "BEGIN PRIVATE KEY" in pem
    der = base64.b64decode("".join(l for l in pem.splitlines() if not l.startswith("-----")))
    key = tmp_path / "office.pk8"
    key.write_bytes(der)
    r = subprocess.run(
        ["java", "-cp", str(jar), str(repo / "tests/python/jdbc/PgDoor.java"), str(pg_port),
         str(certs.dir), office.name, str(key)],
        capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("product PostgreSQL"), lines
    assert lines[1] == "tables census,divisions,enrollment,fever_clinics,underground_pipelines,", lines
    assert lines[2].endswith(f" {anji_population(expected)}"), lines
    assert lines[3].startswith("warning fedgate answer: 1 rows"), lines
    assert lines[4] == f"fetched {census_rows()}", lines
    assert lines[5] == "sqlstate 42P01", lines
