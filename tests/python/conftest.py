"""Fixtures of fedgate's Python end-to-end tests.

tests/python/run starts `fedgate demo --dir D --port-base B` and exports:

    FEDGATE_DEMO_DIR   D (the materialized region: region.toml, certs/, data/)
    FEDGATE_PORT_BASE  B (gRPC + Flight SQL, mutual TLS: shanghai B, hangzhou B+1,
                       suzhou B+2, hefei B+3, anji B+4, the office's gateway
                       (coordination) B+5; HTTP port = gRPC port + 1000)
    FEDGATE_REPO       the repository root
    FEDGATE_ARTIFACTS  where tests leave files for people (screenshots)

A test that needs the running region FAILS (never skips) when these are missing, so a
CI run without the server cannot pass by skipping everything. Expected values come
from fedgate_expected.py: plain Python over the member source files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

import fedgate_expected

GATEWAY_MEMBERS = fedgate_expected.GATEWAY_MEMBERS
PORT_OFFSETS = {name: i for i, name in enumerate(fedgate_expected.GATEWAYS)}
HTTP_OFFSET = 1000



def require_env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.fail(
            f"environment variable {name} is not set: these tests need a running "
            "`fedgate demo` region; run them with tests/python/run, which starts it and "
            "exports FEDGATE_DEMO_DIR, FEDGATE_PORT_BASE, FEDGATE_REPO and FEDGATE_ARTIFACTS",
            pytrace=False,
        )
    return value


@pytest.fixture(scope="session")
def repo() -> Path:
    return fedgate_expected.REPO


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return fedgate_expected.DATA


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    d = Path(require_env("FEDGATE_DEMO_DIR"))
    if not (d / "certs" / "ca.crt").is_file():
        pytest.fail(f"FEDGATE_DEMO_DIR={d} has no certs/ca.crt: is `fedgate demo --dir {d}` running?",
                    pytrace=False)
    return d


@pytest.fixture(scope="session")
def port_base() -> int:
    raw = require_env("FEDGATE_PORT_BASE")
    try:
        return int(raw)
    except ValueError:
        pytest.fail(f"FEDGATE_PORT_BASE={raw!r} is not a port number", pytrace=False)


@pytest.fixture(scope="session")
def grpc_ports(port_base) -> dict[str, int]:
    """gRPC (and Flight SQL) port of each gateway, mutual TLS."""
    return {m: port_base + off for m, off in PORT_OFFSETS.items()}


@pytest.fixture(scope="session")
def http_ports(grpc_ports) -> dict[str, int]:
    """HTTP port of each gateway: shanghai's and the office's are HTTPS with mutual TLS,
    the others plain."""
    return {m: p + HTTP_OFFSET for m, p in grpc_ports.items()}


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    d = Path(require_env("FEDGATE_ARTIFACTS"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@dataclass(frozen=True)
class Identity:
    """A region identity's certificate and key (paths and PEM texts)."""

    name: str
    cert_path: Path
    key_path: Path

    @property
    def cert_pem(self) -> str:
        return self.cert_path.read_text()

    @property
    def key_pem(self) -> str:
        return self.key_path.read_text()


@dataclass(frozen=True)
class Certs:
    dir: Path

    @property
    def ca_path(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def ca_pem(self) -> str:
        return self.ca_path.read_text()

    def identity(self, name: str) -> Identity:
        ident = Identity(name, self.dir / f"{name}.crt", self.dir / f"{name}.key")
        for p in (ident.cert_path, ident.key_path):
            if not p.is_file():
                pytest.fail(f"missing {p} in the demo region", pytrace=False)
        return ident


@pytest.fixture(scope="session")
def certs(demo_dir) -> Certs:
    return Certs(demo_dir / "certs")


@pytest.fixture(scope="session")
def office(certs) -> Identity:
    """The regional coordination office (fedgate://yrd/office/coordination); it queries
    through its own gateway (coordination), which speaks for it to the data owners."""
    return certs.identity("coordination")


@pytest.fixture(scope="session")
def expected() -> fedgate_expected.Expected:
    return fedgate_expected.Expected()


@pytest.fixture(scope="session")
def fever_clinic_members() -> list[str]:
    return list(fedgate_expected.FEVER_CLINIC_MEMBERS)
