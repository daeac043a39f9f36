"""Lock SeaweedFS down so that only the S3 keys write: its security.toml, JWT keys and gRPC mTLS.

`weed mini` opens, besides S3, HTTP ports for its master, volume server, filer and admin, and a
gRPC port for each. Unsecured, the filer's HTTP and gRPC ports take writes from any local process,
and those objects read back through signed S3. Here (read by weed from its working directory):
- JWT signing keys: the volume server takes writes only with a master-issued token, the filer only
  with one from the S3 gateway (reads too);
- gRPC mutual TLS with a private CA made for this stack: a client without the stack's certificate
  cannot even connect (`weed filer.copy`, `weed upload`, `weed shell` are refused);
- no directory listings or volume UI.
The S3 gateway itself checks SigV4 against the stack's keys. All files are mode 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
import secrets
from pathlib import Path

SECURITY_FILE = "security.toml"
TLS_DIR = "tls"
# Every weed component that serves or dials gRPC; one certificate serves all (weed does not check
# host names, and the CA is this stack's own).
GRPC_COMPONENTS = (
    "master",
    "volume",
    "filer",
    "s3",
    "admin",
    "worker",
    "mq",
    "msg_broker",
    "msg_agent",
    "client",
)


def _write_private(path: Path, data: bytes) -> None:
    from eagle3.io import write_atomic

    write_atomic(path, data, mode=0o600)


def make_tls(dir: Path) -> tuple[Path, Path, Path]:
    """A private CA and one certificate for 127.0.0.1 (server and client use), ten years."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    start = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)
    end = start + datetime.timedelta(days=3650)

    def name(cn: str):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("eagle3-stack-ca"))
        .issuer_name(name("eagle3-stack-ca"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    usage = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name("eagle3-stack"))
        .issuer_name(name("eagle3-stack-ca"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    paths = (dir / "ca.crt", dir / "weed.crt", dir / "weed.key")
    _write_private(paths[0], ca.public_bytes(pem))
    _write_private(paths[1], cert.public_bytes(pem))
    _write_private(
        paths[2],
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    return paths


def security_toml(ca: Path, cert: Path, key: Path) -> str:
    lines = []
    for section in (
        "jwt.signing",
        "jwt.signing.read",
        "jwt.filer_signing",
        "jwt.filer_signing.read",
    ):
        lines += [
            f"[{section}]",
            f'key = "{secrets.token_hex(32)}"',
            "expires_after_seconds = 10",
            "",
        ]
    lines += [
        "[access]",
        "ui = false",
        "",
        "[filer.expose_directory_metadata]",
        "enabled = false",
        "",
    ]
    lines += ["[grpc]", f'ca = "{ca}"', ""]
    for comp in GRPC_COMPONENTS:
        lines += [f"[grpc.{comp}]", f'cert = "{cert}"', f'key = "{key}"', ""]
    return "\n".join(lines)


def ensure_security(dir: Path) -> Path:
    """`dir`/security.toml (and its certificates), made once per stack and kept across restarts."""
    path = dir / SECURITY_FILE
    tls = dir / TLS_DIR
    if path.is_file() and all((tls / n).is_file() for n in ("ca.crt", "weed.crt", "weed.key")):
        return path
    ca, cert, key = make_tls(tls)
    _write_private(path, security_toml(ca.resolve(), cert.resolve(), key.resolve()).encode())
    return path
