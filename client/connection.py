"""Where and how the clients connect: replica urls, the API key header, TLS, timeouts, gRPC channel options."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from embedline import wire
from embedline.client.errors import API_KEY_ENV


DEFAULT_URL = f"127.0.0.1:{wire.DEFAULT_PORTS['grpc']}"
DEFAULT_TIMEOUT_S = 30.0


def validate_url(url: str) -> str:
    """gRPC urls are `host:port`; a scheme is the usual mistake of passing the HTTP url."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"url must be 'host:port', got {url!r}")
    url = url.strip()
    if "://" in url:
        raise ValueError(f"url must be the gRPC 'host:port' without a scheme, got {url!r}")
    return url


def validate_urls(url: str | Sequence[str]) -> tuple[str, ...]:
    """One `host:port`, or a list / tuple of them (replicas of the same server) -> a tuple of urls."""
    if not isinstance(url, (list, tuple)):
        return (validate_url(url),)
    if not url:
        raise ValueError("url is an empty list; give at least one 'host:port'")
    urls = tuple(validate_url(item) for item in url)
    if len(set(urls)) != len(urls):
        raise ValueError(f"url lists a replica more than once: {list(urls)}")
    return urls


def describe_urls(urls: Sequence[str]) -> str:
    """How messages name the server when no single replica is to blame."""
    return urls[0] if len(urls) == 1 else "replicas " + ", ".join(urls)


def resolve_api_key(api_key: str | None) -> str | None:
    """The API key: the argument, else $EMBEDLINE_API_KEY; empty (or blank) means no key.

    Messages here never quote the key, not even a malformed one.
    """
    if api_key is None:
        api_key = os.environ.get(API_KEY_ENV, "")
    if not isinstance(api_key, str):
        raise TypeError(f"api_key must be a str or None, got {type(api_key).__name__}")
    api_key = api_key.strip()
    if api_key and not (api_key.isascii() and api_key.isprintable()):
        raise ValueError(f"api_key (or {API_KEY_ENV}) must be printable ASCII: it is sent as a gRPC header")
    return api_key or None


def auth_headers(api_key: str | None) -> dict[str, str] | None:
    """The gRPC metadata every RPC carries with a key, or None without one.

    Triton's restricted protocols check a gRPC header under a `triton-grpc-protocol-` prefix (HTTP takes
    the plain name), so the key goes under both names: the prefixed one is what the embedline server
    checks, the plain one what a proxy or gateway in front of it would.
    """
    if not api_key:
        return None
    value = f"Bearer {api_key}"
    return {"authorization": value, "triton-grpc-protocol-authorization": value}


def tls_arguments(ssl: bool, root_certificates: str | None) -> dict[str, Any]:
    """tritonclient's `ssl` / `root_certificates` arguments, checked when the client is built.

    tritonclient reads the PEM file when it opens a channel, which the asyncio client does only at
    its first call: a missing file is reported here instead.
    """
    if root_certificates is not None:
        if not ssl:
            raise ValueError("root_certificates is only used with ssl=True")
        if not os.path.isfile(root_certificates):
            raise ValueError(f"root_certificates: no such file {root_certificates!r}")
    return {"ssl": bool(ssl), "root_certificates": root_certificates}


def resolve_timeout(timeout: float | None, default: float) -> float:
    value = default if timeout is None else timeout
    if not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {value!r}")
    return float(value)


def channel_args(grpcclient: Any) -> list[tuple[str, Any]]:
    """gRPC channel options: tritonclient's defaults plus a faster reconnect schedule.

    tritonclient uses these exact defaults when `channel_args` is not given; passing our own list
    replaces them all, so they are restated. gRPC waits 1 s (growing to 120 s) before reconnecting
    to a server it failed to reach, failing calls immediately meanwhile; our retries back off on a
    50 ms..1 s scale, so the channel must be willing to reconnect on that scale too. (Not
    `grpc.min_reconnect_backoff_ms`: despite the name it is the connect timeout.)
    """
    keepalive = grpcclient.KeepAliveOptions()
    return [
        ("grpc.max_send_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
        ("grpc.initial_reconnect_backoff_ms", 50),
        ("grpc.max_reconnect_backoff_ms", 1000),
    ]
