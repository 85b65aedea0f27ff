"""Bounded reading of input that someone else controls: files, devices, JSON, helper programs.

Every boot channel reads what a site (or whoever wrote the file) put there, so every read here has
a bound the writer cannot move: a byte limit, the expected file type, a nesting depth, a deadline.

- Files are opened ``O_NONBLOCK``: a FIFO where a file belongs opens at once instead of blocking
  until a writer appears, and is then refused by type (``fstat``). ``O_NOFOLLOW`` unless the
  caller expects a link (udev's ``/dev/disk/by-label`` and ``by-id`` links are resolved on purpose).
  procfs and sysfs files are regular files whose size says nothing: reading stops at the limit.
- JSON is checked for size and nesting depth before it is parsed (the stdlib parser recurses),
  duplicate keys and NaN/Infinity are refused, and NUL or lone surrogates in strings (never text;
  they break paths and encodings downstream) and control characters in keys are refused.
- Helper programs (mtools) run with an overall deadline and a bound on what they write.

Errors are :class:`InputError` (a ValueError: bad input) whose message names the file or program
and the fault, never the content (a file may carry K).
"""

from __future__ import annotations

import enum
import errno
import fcntl
import itertools
import json
import os
import re
import selectors
import stat
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imprint.safetext import printable

READ_CHUNK = 64 * 1024


class InputError(ValueError):
    """Input refused: the message names where it came from and what is wrong with it."""


class TooLarge(InputError):
    """More input than the bound allows."""


class ToolMissing(InputError):
    """The helper program is not installed."""


class JsonSyntaxError(InputError):
    """Not JSON at all (the parser's message, with a position): a caller may try another format."""


class FileType(enum.Enum):
    REGULAR = "a regular file"
    DEVICE = "a block device or an image file"  # a test root links by-label names to image files


def _describe(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


def _accepts(kind: FileType, mode: int) -> bool:
    if kind is FileType.DEVICE:
        return stat.S_ISREG(mode) or stat.S_ISBLK(mode)
    return stat.S_ISREG(mode)


def open_checked(path: Path, kind: FileType = FileType.REGULAR, *, follow_links: bool = False,
                 write: bool = False) -> int | None:
    """A file descriptor for ``path`` once it is known to be ``kind``; None when it does not exist.

    The descriptor is blocking again when returned (O_NONBLOCK only keeps the open from waiting).
    """
    flags = (os.O_WRONLY if write else os.O_RDONLY) | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
    if not follow_links:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow_links:
            raise InputError(f"cannot read {path}: it is a symbolic link, which is not followed here") from None
        if exc.errno == errno.ENXIO:  # O_WRONLY|O_NONBLOCK on a FIFO nobody reads
            raise InputError(f"cannot open {path}: it is a FIFO, not {kind.value}") from None
        raise InputError(f"cannot {'open' if write else 'read'} {path}: {exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not _accepts(kind, mode):
            raise InputError(f"cannot {'open' if write else 'read'} {path}: it is {_describe(mode)}, "
                             f"not {kind.value}")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_fd(fd: int, limit: int, where: object, what: str = "") -> bytes:
    """At most ``limit`` bytes from ``fd`` to its end; TooLarge when there is more."""
    parts: list[bytes] = []
    total = 0
    while total <= limit:
        try:
            chunk = os.read(fd, min(READ_CHUNK, limit + 1 - total))
        except OSError as exc:
            raise InputError(f"cannot read {where}: {exc.strerror}") from None
        if not chunk:
            break
        parts.append(chunk)
        total += len(chunk)
    if total > limit:
        raise TooLarge(f"{where} is larger than {limit} bytes{what}")
    return b"".join(parts)


def read_file(path: Path, limit: int, *, what: str = "", follow_links: bool = False) -> bytes | None:
    """The content of the regular file ``path``, at most ``limit`` bytes; None when it does not exist.

    ``what`` is added to the too-large message (say, ": not a token file").
    """
    fd = open_checked(path, FileType.REGULAR, follow_links=follow_links)
    if fd is None:
        return None
    try:
        size = os.fstat(fd).st_size
        if size > limit:  # st_size of procfs and sysfs files is 0 or a page: then only reading tells
            raise TooLarge(f"{path} is larger than {limit} bytes{what}")
        return read_fd(fd, limit, path, what)
    finally:
        os.close(fd)


def device_size(fd: int) -> int:
    # lseek to the end works for regular files and block devices alike (st_size is 0 for the latter).
    return os.lseek(fd, 0, os.SEEK_END)


# -- JSON

MAX_JSON_DEPTH = 64
MAX_NUMBER_DIGITS = 64
# Strings (with their escapes) and brackets: the nesting depth is what remains once strings are gone.
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_DEPTH = {"[": 1, "{": 1, "]": -1, "}": -1}
_BAD_IN_STRING = re.compile("[\x00\ud800-\udfff]")
_BAD_IN_KEY = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")


def _depth(text: str) -> int:
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    return max(itertools.accumulate(map(_DEPTH.__getitem__, brackets)), default=0)


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if _BAD_IN_KEY.search(key):
            raise InputError(f"the key {printable(key, 80)} has a control character")
        if key in result:
            raise InputError(f"the key {printable(key, 80)} is given twice in one object")
        result[key] = value
    return result


def _number(text: str) -> int:
    if len(text) > MAX_NUMBER_DIGITS:
        raise InputError(f"a number of {len(text)} digits (at most {MAX_NUMBER_DIGITS})")
    return int(text)


def _constant(name: str) -> Any:
    raise InputError(f"{name} is not a JSON value")


def _check_strings(document: Any) -> None:
    # Iterative (the depth is bounded anyway): keys were checked while parsing.
    pending = [document]
    while pending:
        node = pending.pop()
        if isinstance(node, str):
            if _BAD_IN_STRING.search(node):
                raise InputError("a string holds a NUL character or a lone surrogate (not text)")
        elif isinstance(node, dict):
            pending.extend(node.values())
        elif isinstance(node, list):
            pending.extend(node)


def load_json(data: bytes, *, limit: int, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """The JSON document in ``data`` (UTF-8), within ``limit`` bytes and ``max_depth`` levels.

    The message of the InputError raised says what is wrong (for invalid JSON: the parser's
    message, which gives a position, never the content); callers add where the document is from.
    """
    if len(data) > limit:
        raise TooLarge(f"the document is larger than {limit} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"not UTF-8 (byte {exc.start})") from None
    depth = _depth(text)
    if depth > max_depth:
        raise InputError(f"nested {depth} levels deep (at most {max_depth})")
    try:
        document = json.loads(text, object_pairs_hook=_object, parse_int=_number, parse_constant=_constant)
    except json.JSONDecodeError as exc:
        raise JsonSyntaxError(str(exc)) from None
    except RecursionError:  # cannot happen within the depth bound; never a traceback if it does
        raise InputError("nested too deep to parse") from None
    except ValueError as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"invalid value: {type(exc).__name__}") from None
    _check_strings(document)
    return document


# -- helper programs


@dataclass(frozen=True)
class ToolResult:
    returncode: int
    stdout: bytes
    stderr: bytes


def run_tool(argv: Sequence[str], *, limit: int, timeout: float, env: Mapping[str, str] | None = None,
             stdin: bytes = b"") -> ToolResult:
    """Run a helper program over someone else's data: it must finish within ``timeout`` seconds
    (all of it, not per read) and write at most ``limit`` bytes to each of stdout and stderr.

    Raises InputError naming the program when it is missing, overruns the deadline (it is killed)
    or writes too much (TooLarge; killed too).
    """
    name = os.path.basename(argv[0])
    deadline = time.monotonic() + timeout
    try:
        proc = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=None if env is None else dict(env))
    except FileNotFoundError:
        raise ToolMissing(f"{name} is not installed") from None
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    output = {out_fd: bytearray(), err_fd: bytearray()}
    pending = memoryview(stdin)
    try:
        with selectors.DefaultSelector() as selector:
            for fd in output:
                selector.register(fd, selectors.EVENT_READ)
            if pending:
                os.set_blocking(proc.stdin.fileno(), False)
                selector.register(proc.stdin.fileno(), selectors.EVENT_WRITE)
            else:
                proc.stdin.close()
            while selector.get_map():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise InputError(f"{name} did not finish within {timeout:g} s")
                for key, _ in selector.select(remaining):
                    if key.fd in output:
                        chunk = os.read(key.fd, READ_CHUNK)
                        if not chunk:
                            selector.unregister(key.fd)
                            continue
                        output[key.fd] += chunk
                        if len(output[key.fd]) > limit:
                            raise TooLarge(f"{name} wrote more than {limit} bytes")
                        continue
                    try:
                        pending = pending[os.write(key.fd, pending[:READ_CHUNK]):]
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:
                        pending = pending[:0]
                    if not pending:
                        selector.unregister(key.fd)
                        proc.stdin.close()
        try:
            returncode = proc.wait(max(deadline - time.monotonic(), 0.001))
        except subprocess.TimeoutExpired:
            raise InputError(f"{name} did not finish within {timeout:g} s") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            stream.close()
    return ToolResult(returncode, bytes(output[out_fd]), bytes(output[err_fd]))
