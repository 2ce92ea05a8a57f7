"""`synapse certs`: a self-signed TLS certificate and key for a gateway on a local network (wss:// for phones)."""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
from pathlib import Path

from services.common.errors import FailedPrecondition

HELP = "Write a self-signed certificate + key (PEM) for the gateway's wss:// endpoint on a local network."

CERT_FILE = "gateway-cert.pem"
KEY_FILE = "gateway-key.pem"
ALWAYS = ("localhost", "127.0.0.1")
# Apple devices (and Chrome on macOS) refuse TLS server certificates valid for longer than this.
MAX_DAYS = 825


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="Folder to write the pair into (created).")
    parser.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="NAME",
        help="Host name or IP address nodes use to reach the gateway (repeatable); "
        "localhost and 127.0.0.1 are always included.",
    )
    parser.add_argument("--days", type=_days, default=365, help=f"Validity in days, 1-{MAX_DAYS} (default 365).")
    parser.add_argument("--force", action="store_true", help="Overwrite an existing pair in --out.")


def _days(text: str) -> int:
    days = int(text)
    if not 1 <= days <= MAX_DAYS:
        raise argparse.ArgumentTypeError(
            f"{days} is outside 1-{MAX_DAYS}: Apple devices refuse certificates valid longer than "
            f"{MAX_DAYS} days; make a new pair when this one expires"
        )
    return days


def subject_names(hosts: list[str]) -> list[str]:
    """The given names first (the first is the common name), then localhost and 127.0.0.1, without repeats."""
    names: list[str] = []
    for host in [*hosts, *ALWAYS]:
        host = host.strip().lower()
        if host and host not in names:
            names.append(host)
    return names


def make_pair(hosts: list[str], days: int) -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM): ECDSA P-256, SANs for `hosts`, serverAuth, usable as its own CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    names = subject_names(hosts)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Synapse (self-signed)"),
            x509.NameAttribute(NameOID.COMMON_NAME, names[0][:64]),
        ]
    )
    now = datetime.datetime.now(datetime.UTC)
    public_key = key.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerate clocks a little behind
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_general_name(name) for name in names]), critical=False)
        # CA:TRUE so phones can install it as a trusted root (Android and iOS require it).
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem


def _general_name(name: str):
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def write_pair(folder: Path, cert_pem: bytes, key_pem: bytes, *, force: bool) -> tuple[Path, Path]:
    """Write both files; the key is created with mode 0600 (never readable by others, even for a moment)."""
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / CERT_FILE, folder / KEY_FILE
    existing = [str(path) for path in (cert_path, key_path) if path.exists()]
    if existing and not force:
        raise FailedPrecondition(f"{', '.join(existing)} already exist; pass --force to replace them")
    key_path.unlink(missing_ok=True)
    descriptor = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        os.fchmod(handle.fileno(), 0o600)  # whatever the umask
        handle.write(key_pem)
    cert_path.write_bytes(cert_pem)
    return cert_path, key_path


def run(args: argparse.Namespace) -> int:
    names = subject_names(args.host)
    cert_path, key_path = write_pair(args.out, *make_pair(args.host, args.days), force=args.force)
    cert_path, key_path = cert_path.resolve(), key_path.resolve()
    host = names[0]
    print(f"wrote {cert_path} (valid {args.days} days for {', '.join(names)})")
    print(f"wrote {key_path} (private key, mode 0600: keep it on the gateway machine)")
    print("\ngateway:")
    print(f"  SYNAPSE_GATEWAY_TLS_CERT={cert_path}")
    print(f"  SYNAPSE_GATEWAY_TLS_KEY={key_path}")
    print("  SYNAPSE_GATEWAY_WS_HOST=0.0.0.0   # to accept nodes from other machines")
    print("\nnative nodes:")
    print(f"  SYNAPSE_NODE_TLS_CA={cert_path}")
    print(f"  SYNAPSE_NODE_GATEWAY_URL=wss://{host}:8765/ws")
    print(
        f"\nbrowsers: open https://{host}:8765/ and accept the certificate once, or install "
        f"{cert_path.name} as a trusted certificate on the device."
    )
    return 0
