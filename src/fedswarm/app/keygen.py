"""`fedswarm keygen DIR`: a development CA, a server certificate, client Ed25519 keys and authorized_keys."""
from __future__ import annotations

import argparse
import base64
import datetime as dt
import ipaddress
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS, SERVER_DAYS = 3650, 825


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="folder to write into (created if missing)")
    p.add_argument("--clients", type=int, default=2, help="number of client keys (client-0 .. client-N-1)")
    p.add_argument("--hosts", default="127.0.0.1,localhost",
                   help="comma-separated names / IP addresses the coordinator is dialled by (certificate SANs)")
    p.add_argument("--force", action="store_true", help="overwrite files that already exist")


def _write(path: Path, data: bytes, private: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600 if private else 0o644)
        f.write(data)


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_ca(now: dt.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedswarm development CA")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def make_server_cert(ca_key, ca_cert: x509.Certificate, hosts: list[str],
                     now: dt.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
            .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def keygen(out: Path, clients: int, hosts: list[str], force: bool = False) -> list[Path]:
    """Write everything into `out`; returns the paths written. Refuses to overwrite unless `force`."""
    names = ["ca.pem", "ca.key", "server.pem", "server.key", "authorized_keys"]
    names += [f"client-{i}.{ext}" for i in range(clients) for ext in ("key", "pub")]
    existing = [n for n in names if (out / n).exists()]
    if existing and not force:
        raise FileExistsError(f"{out} already holds {', '.join(existing)}; pass --force to overwrite "
                              "(clients and the coordinator then need the new files)")
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key, ca_cert = make_ca(now)
    server_key, server_cert = make_server_cert(ca_key, ca_cert, hosts, now)
    pem = serialization.Encoding.PEM
    files = [("ca.pem", ca_cert.public_bytes(pem), False), ("ca.key", _key_pem(ca_key), True),
             ("server.pem", server_cert.public_bytes(pem), False), ("server.key", _key_pem(server_key), True)]
    lines = ["# fedswarm authorized_keys: `ed25519 <base64 raw public key> name`, one per line"]
    for i in range(clients):
        key = ed25519.Ed25519PrivateKey.generate()
        pub = base64.b64encode(key.public_key().public_bytes(serialization.Encoding.Raw,
                                                             serialization.PublicFormat.Raw)).decode()
        files += [(f"client-{i}.key", _key_pem(key), True), (f"client-{i}.pub", f"{pub}\n".encode(), False)]
        lines.append(f"ed25519 {pub} client-{i}")
    files.append(("authorized_keys", ("\n".join(lines) + "\n").encode(), False))
    for name, data, private in files:
        _write(out / name, data, private)
    return [out / name for name, _, _ in files]


def main(args: argparse.Namespace) -> int:
    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    if not hosts:
        print("error: --hosts needs at least one host name or IP address", file=sys.stderr)
        return 2
    if args.clients < 0:
        print("error: --clients must be >= 0", file=sys.stderr)
        return 2
    try:
        written = keygen(Path(args.dir), args.clients, hosts, args.force)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}{'  (private, 0600)' if path.suffix == '.key' else ''}")
    print(f"server certificate for: {', '.join(hosts)}")
    return 0
