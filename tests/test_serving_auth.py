"""API key, TLS and exposure rules of `embedline serve`, against the real launcher and tritonserver."""

from __future__ import annotations

import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest

from embedline.client import AuthenticationError, EmbeddingClient

KEY = "s3cret-key_for-tests"


def http_status(url: str, method: str = "GET", headers: dict | None = None) -> int:
    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.fixture
def keyed_server(launch_serve, tiny_fp32, tmp_path):
    key_file = tmp_path / "api-key"
    key_file.write_text(KEY + "\n")
    return launch_serve("--artifact", str(tiny_fp32.path), "--variant", "fp32", "--api-key-file", str(key_file))


def test_the_api_key_guards_every_protocol_but_health(keyed_server, monkeypatch):
    monkeypatch.delenv("EMBEDLINE_API_KEY", raising=False)
    http = f"http://{keyed_server.http_url}"
    bearer = {"Authorization": f"Bearer {KEY}"}
    assert http_status(f"{http}/v2/health/ready") == 200
    assert http_status(f"{http}/v2/health/live") == 200
    assert http_status(f"{http}/v2/models/embed/config") == 403
    assert http_status(f"{http}/v2/models/embed/config", headers={"Authorization": "Bearer wrong"}) == 403
    assert http_status(f"{http}/v2/models/embed/config", headers=bearer) == 200
    assert http_status(f"{http}/v2/models/stats") == 403
    assert http_status(f"{http}/v2/repository/index", method="POST") == 403
    assert http_status(f"{http}/v2/logging") == 403

    with EmbeddingClient(keyed_server.grpc_url) as anonymous:
        assert anonymous.health()  # health stays open for orchestrators
        with pytest.raises(AuthenticationError) as info:
            anonymous.embed(["hello"])
        assert KEY not in str(info.value)
    with EmbeddingClient(keyed_server.grpc_url, api_key="wrong", max_retries=5) as wrong:
        with pytest.raises(AuthenticationError):
            wrong.embed(["hello"])
    with EmbeddingClient(keyed_server.grpc_url, api_key=KEY) as client:
        assert client.embed(["hello"]).shape == (1, 32)
        assert client.info().dim == 32
    monkeypatch.setenv("EMBEDLINE_API_KEY", KEY)
    with EmbeddingClient(keyed_server.grpc_url) as from_env:
        assert from_env.embed(["hello"]).shape == (1, 32)


def test_a_non_loopback_address_needs_a_key_or_insecure(tiny_fp32, launch_serve, monkeypatch):
    monkeypatch.delenv("EMBEDLINE_API_KEY", raising=False)
    result = subprocess.run(
        [sys.executable, "-m", "embedline.cli", "serve", "--artifact", str(tiny_fp32.path), "--host", "0.0.0.0"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "refusing to serve on 0.0.0.0 without an API key" in result.stderr
    assert "Traceback" not in result.stderr

    served = launch_serve("--artifact", str(tiny_fp32.path), "--variant", "fp32", "--host", "0.0.0.0", "--insecure")
    http = f"http://{served.http_url}"
    assert http_status(f"{http}/v2/models/embed/config") == 200  # inference and metadata stay open
    assert http_status(f"{http}/v2/repository/index", method="POST") == 403  # admin never is
    assert http_status(f"{http}/v2/logging") == 403
    with EmbeddingClient(served.grpc_url) as client:
        assert client.embed(["hello"]).shape == (1, 32)


def self_signed_certificate(directory):
    """A throwaway certificate for 127.0.0.1 / localhost: (cert.pem, key.pem)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_tls_serves_grpc_to_a_client_that_trusts_the_certificate(launch_serve, tiny_fp32, tmp_path):
    cert, key = self_signed_certificate(tmp_path)
    served = launch_serve("--artifact", str(tiny_fp32.path), "--variant", "fp32",
                          "--tls-cert", str(cert), "--tls-key", str(key))
    assert "(TLS)" in served.banner
    with EmbeddingClient(served.grpc_url, ssl=True, root_certificates=str(cert)) as client:
        embeddings = client.embed(["hello", "world"])
    assert embeddings.shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    with EmbeddingClient(served.grpc_url, timeout=3, max_retries=0) as plaintext:
        assert not plaintext.health()  # a plaintext client cannot talk to the TLS port


@pytest.mark.processes
def test_tls_needs_both_files(tiny_fp32, tmp_path):
    cert, _ = self_signed_certificate(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "embedline.cli", "serve", "--artifact", str(tiny_fp32.path), "--tls-cert", str(cert)],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "--tls-cert and --tls-key go together" in result.stderr
