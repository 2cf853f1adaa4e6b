"""A self-signed TLS certificate for the admission webhook, when no certificate is given.

``kubetune operator`` with the webhook on (``KUBETUNE_WEBHOOK_PORT``) and no
``KUBETUNE_WEBHOOK_CERT_FILE`` (the chart's ``webhook.certSecret`` left empty, a plain cluster
without cert-manager) serves with a certificate made here at start-up: an ECDSA P-256 key and a
certificate for the webhook Service's DNS name (``KUBETUNE_WEBHOOK_HOST``), ``localhost`` and
127.0.0.1, valid for ten years, that is its own CA. kopf puts that certificate into the
ValidatingWebhookConfiguration's ``caBundle``, so the API server trusts it. A new one is made at each
start; kopf updates the ``caBundle`` with it.

Why our own: kopf's self-signed path needs ``certbuilder`` (and ``oscrypto``, which misreads the
version of current OpenSSL builds), neither in the operator image; ``cryptography`` is the
maintained library for this and already common in Kubernetes clients' dependency trees.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

VALID_FOR = datetime.timedelta(days=3650)


def self_signed(host: str | None, folder: Path) -> tuple[Path, Path]:
    """Write ``webhook.crt`` and ``webhook.key`` (PEM) into ``folder``; return their paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    names = [name for name in (host, "localhost") if name]
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0]),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kubetune operator")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # clock skew between nodes
        .not_valid_after(now + VALID_FOR)
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName(name) for name in names] + [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / "webhook.crt", folder / "webhook.key"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path
