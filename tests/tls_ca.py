"""A throwaway certificate authority for TLS tests (made in memory with ``cryptography``)."""
from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # an unrelated CA (its certificates must not be trusted)
    rogue_client_cert: Path
    rogue_client_key: Path
    ca_key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _ca(cn: str):
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def _leaf(ca_key, ca_cert, cn: str, server: bool):
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
         .not_valid_after(now + dt.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
         .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                               else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    if server:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                         x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                            critical=False)
    return key, b.sign(ca_key, hashes.SHA256())


def make_pki(folder: Path) -> Pki:
    folder.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    ca_key, ca_cert = _ca("ctnode test CA")
    other_key, other_cert = _ca("some other CA")
    paths = {}
    for name, (key, cert) in {
        "server": _leaf(ca_key, ca_cert, "localhost", True),
        "client": _leaf(ca_key, ca_cert, "SENDER", False),
        "rogue_client": _leaf(other_key, other_cert, "SENDER", False),
    }.items():
        (folder / f"{name}.crt").write_bytes(cert.public_bytes(pem))
        _write_key(key, folder / f"{name}.key")
        paths[name] = (folder / f"{name}.crt", folder / f"{name}.key")
    (folder / "ca.crt").write_bytes(ca_cert.public_bytes(pem))
    (folder / "other_ca.crt").write_bytes(other_cert.public_bytes(pem))
    _write_key(ca_key, folder / "ca.key")
    return Pki(folder / "ca.crt", *paths["server"], *paths["client"], folder / "other_ca.crt", *paths["rogue_client"],
               folder / "ca.key")


def issue_client(pki: Pki, folder: Path, cn: str = "SENDER") -> tuple[Path, Path]:
    """Another client certificate from the test CA: (cert, key) paths."""
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(pki.ca.read_bytes())
    key, cert = _leaf(ca_key, ca_cert, cn, False)
    cert_path, key_path = folder / f"{cn}-{cert.serial_number}.crt", folder / f"{cn}-{cert.serial_number}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, key_path)
    return cert_path, key_path


def write_crl(pki: Pki, revoked: list[Path], path: Path) -> Path:
    """A CRL of the test CA revoking the certificates at ``revoked`` (valid from now for a day)."""
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(pki.ca.read_bytes())
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
               .last_update(now - dt.timedelta(minutes=5)).next_update(now + dt.timedelta(days=1)))
    for cert_path in revoked:
        serial = x509.load_pem_x509_certificate(cert_path.read_bytes()).serial_number
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now - dt.timedelta(minutes=1))
            .build())
    path.write_bytes(builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    return path


def tls_node(pki: Pki, mutual: bool = True) -> dict[str, object]:
    """The node's ``[tls]`` settings with the server certificate of ``pki`` (client certificates required
    when ``mutual``)."""
    return {"enabled": True, "cert_file": str(pki.server_cert), "key_file": str(pki.server_key),
            "ca_file": str(pki.ca), "require_client_cert": mutual}


def client_ctx(pki: Pki, cert: bool = True, ca: Path | None = None, rogue: bool = False) -> ssl.SSLContext:
    """A client TLS context trusting ``ca`` (default: the CA of ``pki``), presenting the client certificate
    (the one from the unrelated CA when ``rogue``) unless ``cert`` is false."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca or pki.ca))
    if cert:
        ctx.load_cert_chain(*(map(str, (pki.rogue_client_cert, pki.rogue_client_key) if rogue
                                  else (pki.client_cert, pki.client_key))))
    return ctx
