"""The admission webhook works on a plain cluster: with no certificate given, the operator serves with a
self-signed one for the webhook Service's name, and that certificate is what kopf publishes as the
ValidatingWebhookConfiguration's caBundle (so the API server trusts it). With a certificate given,
nothing is made."""

from __future__ import annotations

import base64
import pathlib
import ssl

import kopf
import pytest
from cryptography import x509

from kubetune.operator import running
from kubetune.operator.settings import Settings

HOST = "kubetune-webhook.kubetune-system.svc"


def _configured(**fields: object) -> kopf.WebhookServer:
    settings = kopf.OperatorSettings()
    running.configure(settings, {"settings": Settings(webhook_port=8443, webhook_host=HOST, **fields)})
    server = settings.admission.server
    assert isinstance(server, kopf.WebhookServer)
    return server


def _handshake(server_context: ssl.SSLContext, client_context: ssl.SSLContext, hostname: str) -> bool:
    """A TLS handshake between the two contexts over memory buffers; raises what the client refuses."""
    client_in, client_out, server_in, server_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_context.wrap_bio(client_in, client_out, server_hostname=hostname)
    server = server_context.wrap_bio(server_in, server_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(20):
        for name, side in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    side.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        server_in.write(client_out.read())
        client_in.write(server_out.read())
        if all(done.values()):
            return True
    return False


def test_without_a_certificate_the_operator_serves_a_self_signed_one_that_kopf_publishes_as_the_ca() -> None:
    server = _configured()
    assert server.certfile and server.pkeyfile
    pem = pathlib.Path(server.certfile).read_bytes()
    cert = x509.load_pem_x509_certificate(pem)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert HOST in names
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca  # its own CA
    # The server loads the pair, and the caBundle kopf writes into the webhook configuration is this certificate.
    cadata, context = server._build_ssl()
    assert cadata == pem
    assert context is not None
    # The API server, trusting only the caBundle kopf publishes, completes a TLS handshake with the
    # webhook server under the Service's name (and would refuse another name).
    bundle = base64.b64decode(base64.b64encode(cadata)).decode()
    assert _handshake(context, ssl.create_default_context(cadata=bundle), HOST)
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(context, ssl.create_default_context(cadata=bundle), "other.example")
    assert oct(pathlib.Path(server.pkeyfile).stat().st_mode & 0o777) == "0o600"


def test_a_given_certificate_is_used_as_it_is(tmp_path: pathlib.Path) -> None:
    from kubetune.operator.certificates import self_signed

    cert, key = self_signed("elsewhere.example", tmp_path)
    server = _configured(webhook_cert_file=str(cert), webhook_key_file=str(key))
    assert (server.certfile, server.pkeyfile) == (str(cert), str(key))
