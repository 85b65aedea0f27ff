"""A small metadata service for tests: EC2 style (IMDSv2 sessions, a crawlable meta-data tree
with instance tags), OpenStack ``meta_data.json``, and imprint's guest-attributes reply path.

Used in a thread on loopback by tests/test_channels_network.py, and as a program inside a
network namespace at 169.254.169.254::

    python3 tests/helpers/fake_imds.py --listen 169.254.169.254:80 --tag TOKEN

The program prints ``ready HOST:PORT`` once listening, then one ``PUT <path> <body>`` line per
reply it stores, so the test that started it reads both from its stdout.
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

SESSION_PATH = "/latest/api/token"
REPLY_PREFIX = "/latest/guest-attributes/"
OPENSTACK_PATH = "/openstack/latest/meta_data.json"
_VERSIONED = re.compile(r"/(latest|\d{4}-\d{2}-\d{2})/(meta-data|user-data|dynamic)(/.*)?")


@dataclass
class Site:
    """What the service serves; tests change it between requests."""

    tag: str | bytes | None = None  # meta-data/tags/instance/imprint-token; None: no such tag (404)
    openstack: dict[str, Any] | bytes | None = None  # meta_data.json; None: not OpenStack (404)
    user_data: bytes | None = None
    sessions: bool = True  # False: an IMDSv1-only service, the session PUT gets 405
    session_refusal: int = 405
    require_session: bool = True  # IMDSv2 only: a GET without a session token gets 401
    fail_status: int | None = None  # every request gets this status (e.g. 500)
    delay: float = 0.0  # seconds before every answer
    trickle: float = 0.0  # seconds between the bytes of every answer (a service that drips)
    meta: dict[str, Any] = field(default_factory=lambda: {
        "ami-id": "ami-0123456789abcdef0",
        "instance-id": "i-0123456789abcdef0",
        "instance-type": "t3.micro",
        "local-hostname": "ip-10-0-0-5.ec2.internal",
        "local-ipv4": "10.0.0.5",
        "placement": {"availability-zone": "eu-west-1a", "region": "eu-west-1"},
    })
    issued: set[str] = field(default_factory=set)
    requests: list[tuple[str, str]] = field(default_factory=list)
    replies: list[tuple[str, bytes, dict[str, str]]] = field(default_factory=list)
    on_reply: Any = None  # called with (path, body) for each stored reply

    def tree(self) -> dict[str, Any]:
        meta: dict[str, Any] = json.loads(json.dumps(self.meta))
        if self.tag is not None:
            tag = self.tag.decode("latin-1") if isinstance(self.tag, bytes) else self.tag
            meta.setdefault("tags", {}).setdefault("instance", {})["imprint-token"] = tag
        return meta


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes = b"", content_type: str = "text/plain") -> None:
        if self.server.site.trickle:
            self._trickle(status, body, content_type)
            return
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _trickle(self, status: int, body: bytes, content_type: str) -> None:
        answer = (f"HTTP/1.1 {status} {self.responses.get(status, ('',))[0]}\r\n"
                  f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
        try:
            for index in range(len(answer)):
                self.wfile.write(answer[index : index + 1])
                time.sleep(self.server.site.trickle)  # the drip itself is what is tested
        except OSError:
            pass  # the client gave up, as it should
        self.close_connection = True

    def _prologue(self) -> tuple[Site, bool]:
        """Common to every request: record it, delay, fail; False when already answered."""
        site = self.server.site
        site.requests.append((self.command, self.path))
        if site.delay:
            time.sleep(site.delay)
        if site.fail_status is not None:
            self._send(site.fail_status, b"internal error\n")
            return site, False
        return site, True

    def _authorised(self, site: Site) -> bool:
        session = self.headers.get("X-aws-ec2-metadata-token")
        if session is not None:
            ok = session in site.issued
        else:
            ok = not site.require_session
        if not ok:
            self._send(401, b"Unauthorized\n")
        return ok

    def do_PUT(self) -> None:
        site, go_on = self._prologue()
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if not go_on:
            return
        if self.path == SESSION_PATH:
            if not site.sessions:
                self._send(site.session_refusal)
                return
            ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
            if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
                self._send(400, b"Bad Request\n")  # as AWS does
                return
            session = secrets.token_urlsafe(24)
            site.issued.add(session)
            self._send(200, session.encode())
            return
        if self.path.startswith(REPLY_PREFIX):
            if not self._authorised(site):
                return
            site.replies.append((self.path, body, dict(self.headers)))
            if site.on_reply is not None:
                site.on_reply(self.path, body)
            self._send(200)
            return
        self._send(405)

    def do_GET(self) -> None:
        site, go_on = self._prologue()
        if not go_on:
            return
        if self.path == OPENSTACK_PATH:
            if site.openstack is None:
                self._send(404)
            elif isinstance(site.openstack, bytes):
                self._send(200, site.openstack, "application/json")
            else:
                self._send(200, json.dumps(site.openstack).encode(), "application/json")
            return
        match = _VERSIONED.fullmatch(self.path)
        if match is None:
            self._send(404)
            return
        if not self._authorised(site):
            return
        kind, rest = match.group(2), (match.group(3) or "/")
        if kind == "user-data":
            if site.user_data is None:
                self._send(404)
            else:
                self._send(200, site.user_data)
            return
        if kind == "dynamic":
            self._send(404)
            return
        node: Any = site.tree()
        for part in [p for p in rest.split("/") if p]:
            node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            self._send(404)
        elif isinstance(node, dict):  # a directory listing, as EC2 writes it
            listing = "\n".join(f"{k}/" if isinstance(v, dict) else k for k, v in node.items())
            self._send(200, listing.encode())
        else:
            raw = site.tag if rest.endswith("/imprint-token") and isinstance(site.tag, bytes) else None
            self._send(200, raw if raw is not None else str(node).encode())


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], site: Site) -> None:
        super().__init__(address, _Handler)
        self.site = site

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # a client that gave up waiting (as tests of deadlines make it do)
        super().handle_error(request, client_address)


class FakeIMDS:
    """The service in a background thread; ``url`` is its base URL."""

    def __init__(self, site: Site | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.site = site or Site()
        self._server = _Server((host, port), self.site)
        # A short poll interval: shutdown() waits for it, once per test.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> FakeIMDS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="169.254.169.254:80")
    parser.add_argument("--tag", help="the imprint-token instance tag")
    parser.add_argument("--openstack-token", help="serve meta_data.json with this meta imprint-token")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    site = Site(tag=args.tag)
    if args.openstack_token:
        site.openstack = {"uuid": "0e5e1d7e-6b5f-4f6a-9d55-1a2b3c4d5e6f",
                          "meta": {"imprint-token": args.openstack_token}}

    def on_reply(path: str, body: bytes) -> None:
        print(f"PUT {path} {body.decode('ascii', 'replace').strip()}", flush=True)

    site.on_reply = on_reply
    server = _Server((host, int(port)), site)
    print(f"ready {host}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
