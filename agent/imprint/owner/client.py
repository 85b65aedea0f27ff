"""Requests to a bound VM over mutual TLS, pinned to the VM certificate recorded at bind time."""

from __future__ import annotations

import hashlib
import ssl
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from imprint import crypto, tls
from imprint.owner.errors import Unreachable
from imprint.owner.home import OwnerHome
from imprint.owner.tlsfailures import owner_error

TIMEOUT = 10.0


class PinnedAdapter(HTTPAdapter):
    """Trusts exactly one certificate: the context's only CA is the pin, hostnames are not
    checked (the identity is the key), and urllib3 compares the certificate fingerprint too."""

    def __init__(self, context: ssl.SSLContext, cert_der: bytes) -> None:
        self._context = context
        self._fingerprint = hashlib.sha256(cert_der).hexdigest()
        super().__init__(max_retries=0)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs.update(ssl_context=self._context, assert_hostname=False, assert_fingerprint=self._fingerprint)
        super().init_poolmanager(*args, **kwargs)  # type: ignore[no-untyped-call]


class PinnedClient:
    def __init__(self, home: OwnerHome, vm: str, vm_cert_pem: str, address: str) -> None:
        self.address = address
        self._base = f"https://{address}"
        cert_der = crypto.certificate_der(vm_cert_pem.encode())
        context = tls.owner_pinned_context(str(home.cert_file), str(home.key_file), vm_cert_pem)
        self._session = requests.Session()
        self._session.trust_env = False  # a proxy from the environment must not sit in this channel
        self._session.verify = str(home.write_pin_file(vm, vm_cert_pem))
        self._session.mount("https://", PinnedAdapter(context, cert_der))

    def get(self, path: str) -> dict[str, Any]:
        return self._request("GET", path)

    def post(self, path: str, body: dict[str, Any], *, timeout: float = TIMEOUT) -> dict[str, Any]:
        return self._request("POST", path, json=body, timeout=timeout)

    def _request(self, method: str, path: str, *, timeout: float = TIMEOUT, **kwargs: Any) -> dict[str, Any]:
        try:
            response = self._session.request(method, self._base + path, timeout=timeout, **kwargs)
        except requests.exceptions.RequestException as exc:
            raise owner_error(exc, self.address, f"{method} {path} over the pinned channel") from None
        if response.status_code != 200:
            raise Unreachable(f"the agent at {self.address} answered {response.status_code} to {method} {path}"
                              + _error_text(response))
        try:
            data = response.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise Unreachable(f"the agent at {self.address} answered {method} {path} with something other "
                              "than a JSON object")
        return data

    def close(self) -> None:
        self._session.close()


def _error_text(response: requests.Response) -> str:
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        return ""
    return f": {str(error)[:300]}" if error else ""
