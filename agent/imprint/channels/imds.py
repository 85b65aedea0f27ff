"""HTTP metadata service (a network channel): EC2 style first, then OpenStack.

Where the token is looked for, in order:

- EC2 style, an instance tag ``imprint-token`` (AWS needs "allow tags in instance metadata")::

      PUT http://169.254.169.254/latest/api/token             X-aws-ec2-metadata-token-ttl-seconds: 60
      GET http://169.254.169.254/latest/meta-data/tags/instance/imprint-token
                                                              X-aws-ec2-metadata-token: <session>

  The IMDSv2 session PUT comes first; when it is refused with 403, 404 or 405 (an IMDSv1-only
  service, or one that does not know the PUT) the GET is sent without a session token.
- OpenStack: ``GET http://169.254.169.254/openstack/latest/meta_data.json``, key ``meta`` ->
  ``imprint-token`` (``openstack server create --property imprint-token=...``).

The owner addresses go beside the token under the key ``imprint-owner``: the EC2 instance tag
``latest/meta-data/tags/instance/imprint-owner`` (asked only when the token tag is there, or
when no token is found anywhere, to catch owners given without a token) or OpenStack ``meta``
-> ``imprint-owner`` (a string, or a JSON list of address strings). AWS tag values allow
neither commas nor brackets, so in the tag the addresses may also be separated by spaces
(``owner1.example:7444 192.0.2.7:7444``); an IPv6 literal needs OpenStack metadata or a
service of the site's own. Owner addresses without a token make the channel broken.

The reverse channel (no-secrets mode) is a guest-attributes-style PUT of the VM token line::

      PUT http://169.254.169.254/latest/guest-attributes/imprint/vm-token   (text/plain, one line)

A site that runs its own metadata service stores it there; AWS and OpenStack have no such path
and refuse it, which is logged and otherwise harmless (the console still carries the line).

``IMPRINT_METADATA_URL`` (``http://HOST[:PORT][/PREFIX]``) replaces the base
``http://169.254.169.254``: for a site whose service lives elsewhere, and for tests. Without it
the link-local default is asked only when ``--root`` is ``/``: a test root is not the machine
the agent runs on, so it must never pick up that machine's own metadata (a developer's cloud VM).

Time and size are bounded per answer, not per read: an answer (status line, headers, body) must
be complete within ``READ_TIMEOUT`` of the request, and all the requests of one poll within
``POLL_TIMEOUT`` (the defaults of :class:`Timeouts`, which ``read`` and ``reply`` take), so a
service that trickles its answer a byte at a time cannot hold the agent;
an answer's headers and body are bounded in bytes.

Outcomes: nothing listening, no route, or no complete answer within the timeouts, and a 404 on both
paths, mean *absent* (the agent polls again, so a service that comes up late is still found). A
service that answers with a token that does not parse, invalid JSON, a body that is not text or
too large, an unexpected status, or 5xx after the retries, is *broken*: the error names the URL
and the fault.
"""

from __future__ import annotations

# http.client (stdlib) rather than requests: requests pulls in urllib3, idna, charset
# detection and certifi, which costs start-up time and memory under slow emulation for two or
# three plain-HTTP requests on a link-local address. http.client rather than urllib.request:
# it gives a connect timeout separate from the read timeout, and it never routes through an
# http_proxy from the environment (a proxy cannot reach the VM's own link-local service, and
# must not see the token). Imported where it is used: the agent loads every channel module at
# start, and http.client (with the email package) is only needed when no local channel has a token.
import io
import os
import socket
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from imprint import boundedio, tokens
from imprint.channels.channel import (
    OWNER_KEY,
    TOKEN_KEY,
    Channel,
    ChannelBroken,
    Offer,
    Owners,
    offer,
    parse_owners,
    parse_token,
)
from imprint.guest import log as agent_log
from imprint.guest.distro import Distro
from imprint.safetext import ascii_number, printable

NAME = "http-metadata"
KEY = TOKEN_KEY

DEFAULT_BASE_URL = "http://169.254.169.254"
BASE_URL_ENV = "IMPRINT_METADATA_URL"

SESSION_PATH = "/latest/api/token"
SESSION_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
SESSION_HEADER = "X-aws-ec2-metadata-token"
# Long enough for one read or one reply; a leaked session token soon stops working.
SESSION_TTL_SECONDS = 60
TAG_PATH = f"/latest/meta-data/tags/instance/{KEY}"
OWNER_TAG_PATH = f"/latest/meta-data/tags/instance/{OWNER_KEY}"
OPENSTACK_PATH = "/openstack/latest/meta_data.json"
REPLY_PATH = "/latest/guest-attributes/imprint/vm-token"

# A link-local service answers in milliseconds. Where there is none, packets to
# 169.254.169.254 are often silently dropped, and every poll of the agent pays the connect
# timeout, so it is short. Timeouts are not retried for the same reason; the agent polls again.
CONNECT_TIMEOUT = 1.0
# For the whole answer, from the request to the last byte of the body.
READ_TIMEOUT = 2.0
# For every request of one poll together (session, tag, OpenStack, and their retries).
POLL_TIMEOUT = 8.0
# 5xx and a connection dropped mid-answer are retried: a service that is starting up.
ATTEMPTS = 2
RETRY_PAUSE = 0.2



@dataclass(frozen=True)
class Timeouts:
    """The deadlines and pause of one poll (a test shortens them; the defaults are production's),
    and how the pause is waited (a test acts during it)."""

    connect: float = CONNECT_TIMEOUT
    read: float = READ_TIMEOUT
    poll: float = POLL_TIMEOUT
    retry_pause: float = RETRY_PAUSE
    sleep: Callable[[float], None] = time.sleep


DEFAULT_TIMEOUTS = Timeouts()

MAX_TOKEN_BODY = 4096
# meta_data.json carries SSH keys, a random seed and all user metadata, so it is bigger than
# a token; this bound only stops a runaway answer.
MAX_JSON_BODY = 256 * 1024
# The status line and headers of one answer (a metadata service sends a few hundred bytes).
MAX_HEADER_BYTES = 16 * 1024

log = agent_log.get(__name__)


class Absent(Exception):
    """Nothing answered: the channel is absent for this poll (the reason goes to the debug log)."""


class _Deadline:
    def __init__(self, seconds: float) -> None:
        self._at = time.monotonic() + seconds

    def left(self) -> float:
        """Seconds left; TimeoutError when there are none."""
        remaining = self._at - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("deadline passed")
        return remaining

    def sooner(self, seconds: float) -> _Deadline:
        """This deadline or one ``seconds`` from now, whichever comes first."""
        other = _Deadline(seconds)
        return other if other._at < self._at else self


class _TooLarge(Exception):
    pass


class _AnswerStream(io.RawIOBase):
    """The socket's bytes as http.client reads them: each read waits only until the deadline
    of the whole answer, and the answer may not exceed ``limit`` bytes."""

    def __init__(self, sock: socket.socket, deadline: _Deadline, limit: int) -> None:
        super().__init__()
        self._sock, self._deadline, self._left = sock, deadline, limit

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        self._sock.settimeout(self._deadline.left())
        count = self._sock.recv_into(buffer)
        self._left -= count
        if self._left < 0:
            raise _TooLarge
        return count


class _BoundedSocket:
    """What http.client uses of a socket (sendall, makefile, close), under one deadline."""

    def __init__(self, sock: socket.socket, deadline: _Deadline, limit: int) -> None:
        self._sock, self._deadline, self._limit = sock, deadline, limit

    def sendall(self, data: bytes) -> None:
        self._sock.settimeout(self._deadline.left())
        self._sock.sendall(data)

    def makefile(self, mode: str, *args: object, **kwargs: object) -> io.BufferedReader:
        return io.BufferedReader(_AnswerStream(self._sock, self._deadline, self._limit))

    def close(self) -> None:
        self._sock.close()


@dataclass(frozen=True)
class _Service:
    host: str
    port: int
    prefix: str
    base: str

    def url(self, path: str) -> str:
        return self.base + path


@dataclass(frozen=True)
class _Answer:
    status: int
    body: bytes
    url: str


def _service(paths: Distro) -> _Service | None:
    configured = os.environ.get(BASE_URL_ENV, "").strip()
    if not configured:
        if not paths.is_real_root:
            return None
        configured = DEFAULT_BASE_URL
    base = configured.rstrip("/")
    parts = urllib.parse.urlsplit(base)
    try:
        port = parts.port or 80
    except ValueError:
        port = -1
    if parts.scheme != "http" or not parts.hostname or parts.query or parts.fragment or port < 0:
        raise ChannelBroken(NAME, f"{BASE_URL_ENV}={configured!r} is not an http://HOST[:PORT][/PREFIX] URL")
    return _Service(parts.hostname, port, parts.path, base)


class Readable(Protocol):
    """What an answer is read from: a socket's makefile (or, for fuzzing, bytes in memory)."""

    def makefile(self, mode: str) -> Any: ...


def receive(source: Readable, method: str, url: str, limit: int) -> _Answer:
    """The answer to one request: status and body of at most ``limit`` bytes. Raises
    ChannelBroken for an answer that is not HTTP or too large, TimeoutError or OSError when the
    connection fails, ConnectionError or IncompleteRead when it drops mid-answer."""
    import http.client

    response = http.client.HTTPResponse(source, method=method)  # type: ignore[arg-type]
    try:
        response.begin()
        length = response.getheader("Content-Length")
        if length is not None and ascii_number(length) and int(length) > limit:
            raise ChannelBroken(NAME, f"{url}: the answer is {printable(length, 40)} bytes (at most {limit} expected)")
        data = response.read(limit + 1)
    except _TooLarge:
        raise ChannelBroken(NAME, f"{url}: the answer is larger than {limit + MAX_HEADER_BYTES} bytes "
                                  "with its headers") from None
    except (ConnectionError, http.client.IncompleteRead):
        raise  # dropped mid-answer: the caller retries
    except http.client.HTTPException as exc:
        raise ChannelBroken(NAME, f"{url}: not an HTTP answer ({type(exc).__name__})") from None
    except ValueError:  # http.client lets int() of a bad chunk size through
        raise ChannelBroken(NAME, f"{url}: not an HTTP answer (a malformed chunk)") from None
    finally:
        response.close()
    if len(data) > limit:
        raise ChannelBroken(NAME, f"{url}: the answer is larger than {limit} bytes")
    return _Answer(response.status, data, url)


def _exchange(service: _Service, method: str, path: str, headers: dict[str, str],
              limit: int, poll: _Deadline, timeouts: Timeouts, body: bytes | None = None) -> _Answer:
    """One request with the bounded retries; raises Absent when nothing answers in time."""
    import http.client

    url = service.url(path)
    dropped = ""
    for attempt in range(ATTEMPTS):
        try:
            if attempt:
                timeouts.sleep(min(timeouts.retry_pause, poll.left()))
            conn = http.client.HTTPConnection(service.host, service.port, timeout=min(timeouts.connect, poll.left()))
        except TimeoutError:
            raise Absent(f"{url}: no complete answer within this poll's {timeouts.poll} s") from None
        try:
            try:
                conn.connect()
            except TimeoutError:
                raise Absent(f"{url}: no connection within {timeouts.connect} s") from None
            except OSError as exc:
                raise Absent(f"{url}: {exc.strerror or exc}") from None
            # From here every send and read of the answer is under the answer's deadline.
            bounded = _BoundedSocket(conn.sock, poll.sooner(timeouts.read), limit + MAX_HEADER_BYTES)
            conn.sock = bounded
            conn.request(method, service.prefix + path, body=body, headers=headers)
            answer = receive(bounded, method, url, limit)
        except TimeoutError:
            raise Absent(f"{url}: no complete answer within {timeouts.read} s") from None
        except (ConnectionError, http.client.IncompleteRead) as exc:  # dropped mid-answer
            dropped = type(exc).__name__
            continue
        except OSError as exc:
            raise Absent(f"{url}: {exc.strerror or exc}") from None
        except http.client.HTTPException as exc:  # from sending the request
            raise ChannelBroken(NAME, f"{url}: not an HTTP answer ({type(exc).__name__})") from None
        finally:
            conn.close()
        if answer.status >= 500 and attempt + 1 < ATTEMPTS:
            continue
        return answer
    raise Absent(f"{url}: connection dropped {ATTEMPTS} times ({dropped})")


def _broken_status(answer: _Answer) -> ChannelBroken:
    if answer.status >= 500:
        return ChannelBroken(NAME, f"{answer.url}: HTTP {answer.status} after {ATTEMPTS} attempts")
    return ChannelBroken(NAME, f"{answer.url}: unexpected HTTP {answer.status}")


# -- what an answer means (no network: tests/fuzz/fuzz_imds.py feeds these directly)


def session_from(answer: _Answer) -> str | None:
    """The IMDSv2 session token in the answer to the session PUT; None for a service without
    sessions (IMDSv1, OpenStack)."""
    if answer.status in (403, 404, 405):
        log.debug("%s: HTTP %d, no IMDSv2 session; asking without one", answer.url, answer.status)
        return None
    if answer.status != 200:
        raise _broken_status(answer)
    try:
        session = answer.body.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ChannelBroken(NAME, f"{answer.url}: the IMDSv2 session token is not ASCII text") from None
    # It goes back in a header: no line breaks (header injection), not empty.
    if not session or not session.isprintable():
        raise ChannelBroken(NAME, f"{answer.url}: the IMDSv2 session token is empty or not printable")
    return session


def tag_from(answer: _Answer, session: str | None) -> tokens.Token | None:
    """The token in the answer to the EC2 instance tag GET; None when there is no such tag."""
    if answer.status in (403, 404):  # no such tag; or tags (or the whole service) turned off
        return None
    if answer.status == 401:
        why = "refused the IMDSv2 session token" if session else "requires an IMDSv2 session but refused to open one"
        raise ChannelBroken(NAME, f"{answer.url}: HTTP 401, the service {why}")
    if answer.status != 200:
        raise _broken_status(answer)
    text = _ascii(answer)
    return parse_token(NAME, text, answer.url)


def _ascii(answer: _Answer) -> str:
    try:
        return answer.body.decode("ascii")
    except UnicodeDecodeError:
        raise ChannelBroken(NAME, f"{answer.url}: the answer is not ASCII text") from None


def owner_tag_from(answer: _Answer) -> Owners:
    """The owner addresses in the answer to the EC2 owner tag GET; () when there is no such tag."""
    if answer.status in (403, 404):
        return ()
    if answer.status != 200:
        raise _broken_status(answer)
    text = _ascii(answer)
    if "," not in text:
        # AWS tag values cannot hold commas: spaces separate the addresses there (only spaces:
        # any other control or blank character stays, for the parser to refuse).
        text = ",".join(part for part in text.split(" ") if part)
    return parse_owners(NAME, text, answer.url)


def openstack_from(answer: _Answer) -> Offer | None:
    """The token (and owner addresses) in the answer to the OpenStack meta_data.json GET; None
    when it carries no token."""
    if answer.status in (403, 404):
        return None
    if answer.status != 200:
        raise _broken_status(answer)
    try:
        data = boundedio.load_json(answer.body, limit=MAX_JSON_BODY)
    except boundedio.InputError as exc:
        raise ChannelBroken(NAME, f"{answer.url}: invalid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ChannelBroken(NAME, f"{answer.url}: the JSON is not an object")
    meta = data.get("meta")
    if meta is None:
        return None
    if not isinstance(meta, dict):
        raise ChannelBroken(NAME, f"{answer.url}: 'meta' is not an object")
    owner_where = f"{answer.url} meta '{OWNER_KEY}'"
    owners = parse_owners(NAME, meta[OWNER_KEY], owner_where) if meta.get(OWNER_KEY) is not None else ()
    value = meta.get(KEY)
    token = None
    if value is not None:
        if not isinstance(value, str):
            raise ChannelBroken(NAME, f"{answer.url}: meta '{KEY}' is not a string")
        token = parse_token(NAME, value, f"{answer.url} meta '{KEY}'")
    return offer(NAME, token, owners, owner_where)


# -- the requests


def _headers(session: str | None) -> dict[str, str]:
    return {SESSION_HEADER: session} if session is not None else {}


def _session(service: _Service, poll: _Deadline, timeouts: Timeouts) -> str | None:
    return session_from(_exchange(service, "PUT", SESSION_PATH, {SESSION_TTL_HEADER: str(SESSION_TTL_SECONDS)},
                                  MAX_TOKEN_BODY, poll, timeouts))


def read(paths: Distro, timeouts: Timeouts = DEFAULT_TIMEOUTS) -> Offer | None:
    service = _service(paths)
    if service is None:
        return None
    poll = _Deadline(timeouts.poll)
    try:
        session = _session(service, poll, timeouts)
        headers = _headers(session)

        def owner_tag() -> Owners:
            return owner_tag_from(_exchange(service, "GET", OWNER_TAG_PATH, headers, MAX_TOKEN_BODY, poll,
                                            timeouts))

        token = tag_from(_exchange(service, "GET", TAG_PATH, headers, MAX_TOKEN_BODY, poll, timeouts), session)
        if token is not None:
            return Offer(token, owner_tag())
        found = openstack_from(_exchange(service, "GET", OPENSTACK_PATH, headers, MAX_JSON_BODY, poll, timeouts))
        if found is not None:
            return found
        # No token anywhere: an owner tag alone is a site's mistake, not someone else's service.
        return offer(NAME, None, owner_tag(), service.url(OWNER_TAG_PATH))
    except Absent as exc:
        log.debug("metadata service absent: %s", exc)
        return None


def reply(paths: Distro, line: str, timeouts: Timeouts = DEFAULT_TIMEOUTS) -> bool:
    """PUT the VM token line to the guest-attributes path; False when it did not land there.

    Never fatal: the console carries the same line, and most services do not offer the path.
    """
    try:
        service = _service(paths)
        if service is None:
            return False
        poll = _Deadline(timeouts.poll)
        session = _session(service, poll, timeouts)
        headers = {**_headers(session), "Content-Type": "text/plain; charset=us-ascii"}
        answer = _exchange(service, "PUT", REPLY_PATH, headers, MAX_TOKEN_BODY, poll, timeouts,
                           body=(line + "\n").encode())
    except Absent as exc:
        log.warning("cannot write the VM token to the metadata service: %s", exc)
        return False
    except ChannelBroken as exc:
        log.warning("cannot write the VM token to the metadata service: %s", exc.fault)
        return False
    if not 200 <= answer.status < 300:
        log.warning("the metadata service did not take the VM token: %s: HTTP %d", answer.url, answer.status)
        return False
    return True


# No site artefact: the site runs (or is) the metadata service.
CHANNEL = Channel(NAME, read, network=True, reply=reply)
