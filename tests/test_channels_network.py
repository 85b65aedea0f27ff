"""The HTTP metadata service channel against a real HTTP server (loopback, and at
169.254.169.254 inside network namespaces), and the cloud-init instance-data channel on files
written by hand in cloud-init's shapes and by Debian's cloud-init itself."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from imprint.channels import ChannelBroken, Found, find_token, imds, publish_vm_token
from imprint.channels import cloudinit as ci
from imprint.guest.distro import Distro
from imprint.tokens import Token, TokenKind, vm_token_line

from tests.helpers import AgentFactory, Owner
from tests.helpers.fake_imds import OPENSTACK_PATH, SESSION_PATH, FakeIMDS, Site
from tests.helpers.text import assert_not_echoed

REPO = Path(__file__).resolve().parent.parent
FAKE_IMDS = REPO / "tests" / "helpers" / "fake_imds.py"
RUN_CLOUDINIT = REPO / "tests" / "run_cloudinit.py"
TAG_URL_PATH = "/latest/meta-data/tags/instance/imprint-token"


def new_token(kind: TokenKind = TokenKind.SHARED) -> str:
    return Token(kind, secrets.token_bytes(32)).encode()


def corrupt(token: str) -> str:
    """The same token with one payload character changed: the check digits no longer match."""
    at = len("imprint1s-") + 5
    return token[:at] + ("a" if token[at] != "a" else "b") + token[at + 1:]


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeIMDS]:
    with FakeIMDS() as fake:
        monkeypatch.setenv(imds.BASE_URL_ENV, fake.url)
        yield fake


@pytest.fixture
def paths(tmp_path: Path) -> Distro:
    return Distro(tmp_path / "root")


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# --- HTTP metadata service, EC2 style -----------------------------------------------------------


def test_imdsv2_session_then_tag(server: FakeIMDS, paths: Distro) -> None:
    token = new_token()
    server.site.tag = token
    found = imds.read(paths)
    assert found is not None and found.token.encode() == token
    # The session PUT comes first, and the server (IMDSv2 only) answered the GET: it carried it.
    assert server.site.requests[:2] == [("PUT", SESSION_PATH), ("GET", TAG_URL_PATH)]


@pytest.mark.parametrize("refusal", [403, 404, 405])
def test_imdsv1_fallback_when_the_session_put_is_refused(server: FakeIMDS, paths: Distro,
                                                          refusal: int) -> None:
    token = new_token(TokenKind.NOSECRET)
    server.site.tag = token
    server.site.sessions = False
    server.site.session_refusal = refusal
    server.site.require_session = False
    found = imds.read(paths)
    assert found is not None and found.token.encode() == token


def test_session_refused_but_required_is_broken(server: FakeIMDS, paths: Distro) -> None:
    server.site.tag = new_token()
    server.site.sessions = False  # PUT gets 405, yet every GET without a session gets 401
    with pytest.raises(ChannelBroken) as caught:
        imds.read(paths)
    assert caught.value.channel == "http-metadata"
    assert server.url + TAG_URL_PATH in caught.value.fault
    assert "401" in caught.value.fault


@pytest.mark.parametrize(("body", "fault"), [
    ("corrupt", "check digits do not match"),
    ("imprint1s-not-a-token", "malformed"),
    ("", "empty"),
    (b"\xff\xfeimprint", "not ASCII text"),
    ("a" * 5000, "5000 bytes"),
])
def test_reachable_service_with_a_bad_token_is_broken(server: FakeIMDS, paths: Distro,
                                                      body: str | bytes, fault: str) -> None:
    server.site.tag = corrupt(new_token()) if body == "corrupt" else body
    with pytest.raises(ChannelBroken) as caught:
        imds.read(paths)
    assert server.url + TAG_URL_PATH in caught.value.fault
    assert fault in caught.value.fault
    assert_not_echoed(server.site.tag, caught.value.fault)  # the token is never echoed, str or bytes


def test_http_500_after_retries_is_broken(server: FakeIMDS, paths: Distro) -> None:
    server.site.tag = new_token()
    server.site.fail_status = 500
    with pytest.raises(ChannelBroken) as caught:
        imds.read(paths, imds.Timeouts(retry_pause=0.01))
    assert f"{server.url}{SESSION_PATH}: HTTP 500 after {imds.ATTEMPTS} attempts" in caught.value.fault
    assert server.site.requests == [("PUT", SESSION_PATH)] * imds.ATTEMPTS


def test_one_500_then_success_is_retried(server: FakeIMDS, paths: Distro) -> None:
    token = new_token()
    server.site.tag = token
    server.site.fail_status = 503

    def recover(seconds: float) -> None:  # the service comes back during the retry pause
        server.site.fail_status = None
        time.sleep(seconds)

    found = imds.read(paths, imds.Timeouts(retry_pause=0.01, sleep=recover))
    assert found is not None and found.token.encode() == token


def test_slow_service_is_absent(server: FakeIMDS, paths: Distro) -> None:
    server.site.tag = new_token()
    server.site.delay = 1.5
    assert imds.read(paths, imds.Timeouts(read=0.3)) is None


def test_nothing_listening_is_absent(paths: Distro, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(imds.BASE_URL_ENV, f"http://127.0.0.1:{closed_port()}")
    assert imds.read(paths) is None
    assert imds.reply(paths, "IMPRINT-VM-TOKEN x") is False


def test_no_tag_and_not_openstack_is_absent(server: FakeIMDS, paths: Distro) -> None:
    assert imds.read(paths) is None
    assert ("GET", OPENSTACK_PATH) in server.site.requests


def test_test_root_never_asks_the_default_service(paths: Distro, monkeypatch: pytest.MonkeyPatch) -> None:
    # A test root is not the machine the agent runs on: without IMPRINT_METADATA_URL the
    # link-local default (here pointed at a live server to see whether it is asked) is left alone.
    with FakeIMDS(Site(tag=new_token())) as fake:
        monkeypatch.delenv(imds.BASE_URL_ENV, raising=False)
        monkeypatch.setattr(imds, "DEFAULT_BASE_URL", fake.url)
        assert imds.read(paths) is None
        assert imds.read(Distro(Path("/"))) is not None
        assert fake.site.requests[0] == ("PUT", SESSION_PATH)
        assert len([r for r in fake.site.requests if r[0] == "PUT"]) == 1


@pytest.mark.parametrize("url", ["https://169.254.169.254", "169.254.169.254", "http://h:99999", "http://h/?q"])
def test_bad_base_url_is_broken(paths: Distro, monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv(imds.BASE_URL_ENV, url)
    with pytest.raises(ChannelBroken, match=imds.BASE_URL_ENV):
        imds.read(paths)


def test_base_url_with_a_path_prefix(paths: Distro, monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeIMDS(Site(tag=new_token())) as fake:
        monkeypatch.setenv(imds.BASE_URL_ENV, fake.url + "/")
        assert imds.read(paths) is not None
        monkeypatch.setenv(imds.BASE_URL_ENV, fake.url + "/prefix")
        assert imds.read(paths) is None  # everything under /prefix is 404 here
        assert ("PUT", "/prefix" + SESSION_PATH) in fake.site.requests


# --- HTTP metadata service, OpenStack ----------------------------------------------------------


def openstack_meta_data(meta: dict[str, Any]) -> dict[str, Any]:
    """meta_data.json as Nova serves it (trimmed), with the user metadata in ``meta``."""
    return {
        "uuid": "0e5e1d7e-6b5f-4f6a-9d55-1a2b3c4d5e6f",
        "meta": meta,
        "public_keys": {"owner": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB0x owner@example"},
        "keys": [{"name": "owner", "type": "ssh", "data": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB0x"}],
        "hostname": "web1.novalocal",
        "name": "web1",
        "launch_index": 0,
        "availability_zone": "nova",
        "random_seed": "x" * 700,
        "project_id": "5e3fa9c1c4a54a3ea2f9a8b3e0a0d0c1",
        "devices": [],
    }


@pytest.fixture
def openstack(server: FakeIMDS) -> FakeIMDS:
    # Nova's metadata service has no IMDSv2 sessions and no instance tags.
    server.site.sessions = False
    server.site.session_refusal = 404
    server.site.require_session = False
    return server


def test_openstack_meta(openstack: FakeIMDS, paths: Distro) -> None:
    token = new_token(TokenKind.NOSECRET)
    openstack.site.openstack = openstack_meta_data({"imprint-token": token, "role": "web"})
    found = imds.read(paths)
    assert found is not None and found.token.encode() == token


@pytest.mark.parametrize(("document", "fault"), [
    (b"{not json", "invalid JSON"),
    (b"\xff\xfe", "invalid JSON"),
    (b"[1, 2]", "not an object"),
    ({"meta": ["imprint-token"]}, "'meta' is not an object"),
    ({"meta": {"imprint-token": 7}}, "not a string"),
    ({"meta": {"imprint-token": "corrupt"}}, "check digits do not match"),
])
def test_openstack_broken(openstack: FakeIMDS, paths: Distro, document: Any, fault: str) -> None:
    if isinstance(document, dict) and document["meta"] == {"imprint-token": "corrupt"}:
        document = openstack_meta_data({"imprint-token": corrupt(new_token())})
    openstack.site.openstack = document
    with pytest.raises(ChannelBroken) as caught:
        imds.read(paths)
    assert openstack.url + OPENSTACK_PATH in caught.value.fault
    assert fault in caught.value.fault


def test_openstack_without_the_key_is_absent(openstack: FakeIMDS, paths: Distro) -> None:
    openstack.site.openstack = openstack_meta_data({"role": "web"})
    assert imds.read(paths) is None
    del openstack.site.openstack["meta"]
    assert imds.read(paths) is None


# --- the reverse channel -----------------------------------------------------------------------


def test_reply_puts_the_vm_token_line(server: FakeIMDS, paths: Distro) -> None:
    server.site.tag = new_token(TokenKind.NOSECRET)
    found = imds.read(paths)
    assert found is not None
    line = vm_token_line(Token(TokenKind.VM, secrets.token_bytes(32)))
    assert publish_vm_token(paths, Found("http-metadata", found.token), line) == ["http-metadata"]
    [(path, body, headers)] = server.site.replies
    assert path == imds.REPLY_PATH
    assert body == (line + "\n").encode()
    assert headers["X-aws-ec2-metadata-token"] in server.site.issued


def test_reply_only_when_the_token_came_from_the_service(server: FakeIMDS, paths: Distro) -> None:
    token = Token(TokenKind.NOSECRET, secrets.token_bytes(32))
    assert publish_vm_token(paths, Found("cmdline", token), "IMPRINT-VM-TOKEN x") == []
    assert server.site.requests == []


def test_reply_refused_is_logged_not_fatal(server: FakeIMDS, paths: Distro,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    server.site.require_session = True
    server.site.sessions = False  # so the reply PUT, without a session, gets 401
    assert imds.reply(paths, "IMPRINT-VM-TOKEN x") is False
    assert "HTTP 401" in capsys.readouterr().err
    server.site.fail_status = 500
    assert imds.reply(paths, "IMPRINT-VM-TOKEN x") is False
    assert "HTTP 500" in capsys.readouterr().err


# --- through the registry and the real agent ---------------------------------------------------


def test_find_token_falls_back_to_the_network_channel(server: FakeIMDS, paths: Distro) -> None:
    token = new_token()
    server.site.tag = token
    found = find_token(paths)  # an empty root: every local channel is absent
    assert found is not None
    assert found.channel == "http-metadata" and found.token.encode() == token


@pytest.mark.parametrize("mode", ["shared", "nosecret"])
def test_agent_binds_with_token_and_reply_over_http(agents: AgentFactory, owner: Owner,
                                                    server: FakeIMDS, mode: str) -> None:
    server.site.tag = owner.token("web1", mode)
    agent = agents.start(agents.make_root(None))  # IMPRINT_METADATA_URL is in its environment
    assert f"found a {mode}-mode token" in agent.log() and "http-metadata" in agent.log()
    args = ["bind", "web1", "--address", agent.address]
    if mode == "nosecret":
        [(path, body, _)] = server.site.replies
        vm_token = body.decode().split()[1]
        assert vm_token == agent.vm_token()  # the reply and the console carry the same line
        args += ["--vm-token", vm_token]
    else:
        assert server.site.replies == []  # nothing to send back in shared mode
    bound = owner.json(*args)
    assert bound["mode"] == mode
    assert agent.state()["bound"] is True


# --- inside network namespaces, at the real link-local address ---------------------------------


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    probe = f"imprint-probe-{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], check=True)
    return None


@pytest.fixture
def namespaces() -> Iterator[tuple[str, str]]:
    """Two namespaces joined by a veth pair: the metadata side holds 169.254.169.254/16, the VM
    side 169.254.0.2/16. Nothing is created in the host's own namespace."""
    reason = _netns_unavailable()
    if reason is not None:
        print(f"skipping: {reason}")
        pytest.skip(reason)
    suffix = secrets.token_hex(3)
    metadata_ns, vm_ns = f"imprint-md-{suffix}", f"imprint-vm-{suffix}"
    created: list[str] = []
    try:
        for ns in (metadata_ns, vm_ns):
            subprocess.run(["ip", "netns", "add", ns], check=True)
            created.append(ns)
        commands = [
            # Both ends are created directly inside their namespaces.
            ["ip", "link", "add", "md0", "netns", metadata_ns, "type", "veth", "peer", "name", "vm0", "netns", vm_ns],
            ["ip", "-n", metadata_ns, "addr", "add", "169.254.169.254/16", "dev", "md0"],
            ["ip", "-n", metadata_ns, "link", "set", "md0", "up"],
            ["ip", "-n", metadata_ns, "link", "set", "lo", "up"],
            ["ip", "-n", vm_ns, "addr", "add", "169.254.0.2/16", "dev", "vm0"],
            ["ip", "-n", vm_ns, "link", "set", "vm0", "up"],
            ["ip", "-n", vm_ns, "link", "set", "lo", "up"],
        ]
        for command in commands:
            subprocess.run(command, check=True, capture_output=True)
        yield metadata_ns, vm_ns
    finally:
        for ns in created:  # deleting a namespace deletes its end of the veth pair, and the pair
            subprocess.run(["ip", "netns", "del", ns], check=False)


def run_in_namespace(ns: str, code: str, base_url: str | None = None) -> list[str]:
    """Python code in the VM's namespace, with the default base URL unless given (no proxy)."""
    env = {k: v for k, v in os.environ.items() if k != imds.BASE_URL_ENV and not k.lower().endswith("_proxy")}
    if base_url is not None:
        env[imds.BASE_URL_ENV] = base_url
    result = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code],
                            capture_output=True, text=True, env=env, timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


FIND_OVER_HTTP = (
    "from imprint.channels import find_token\n"
    "from imprint.guest.distro import Distro\n"
    "found = find_token(Distro(), only=['http-metadata'])\n"
    "print(found and found.channel, found and found.token.encode())\n"
)


def test_default_address_in_network_namespaces(namespaces: tuple[str, str]) -> None:
    metadata_ns, vm_ns = namespaces
    # Reachable, nothing listening yet: absent, not an error.
    assert run_in_namespace(vm_ns, FIND_OVER_HTTP) == ["None", "None"]
    # On the link but nobody answers (no ARP reply): the connect timeout, also absent.
    assert run_in_namespace(vm_ns, FIND_OVER_HTTP, base_url="http://169.254.9.9") == ["None", "None"]

    token = new_token(TokenKind.NOSECRET)
    server = subprocess.Popen(
        ["ip", "netns", "exec", metadata_ns, sys.executable, str(FAKE_IMDS),
         "--listen", "169.254.169.254:80", "--tag", token],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert server.stdout is not None
        ready = server.stdout.readline()
        assert ready.startswith("ready 169.254.169.254:80"), server.stderr.read() if server.stderr else ready
        assert run_in_namespace(vm_ns, FIND_OVER_HTTP) == ["http-metadata", token]

        line = vm_token_line(Token(TokenKind.VM, secrets.token_bytes(32)))
        reply = ("from imprint.channels import imds\n"
                 "from imprint.guest.distro import Distro\n"
                 f"print(imds.reply(Distro(), {line!r}))\n")
        assert run_in_namespace(vm_ns, reply) == ["True"]
        assert server.stdout.readline().strip() == f"PUT {imds.REPLY_PATH} {line}"
    finally:
        server.terminate()
        server.wait(timeout=10)
        for stream in (server.stdout, server.stderr):
            if stream is not None:
                stream.close()


# --- cloud-init instance data, hand-written in cloud-init 22.4's shapes ------------------------


def instance_data(ds: dict[str, Any], instance_id: str = "iid-web1", cloud: str = "nocloud") -> dict[str, Any]:
    """instance-data-sensitive.json as DataSource.persist_instance_data writes it (trimmed)."""
    return {
        "base64_encoded_keys": [],
        "ds": {"_doc": "EXPERIMENTAL: The structure and format of content scoped under the 'ds' key "
                       "may change in subsequent releases of cloud-init.", **ds},
        "merged_cfg": {"_doc": "Merged cloud-init system config from /etc/cloud/cloud.cfg and "
                               "/etc/cloud/cloud.cfg.d/", "datasource_list": ["NoCloud", "None"]},
        "sensitive_keys": ["merged_cfg"],
        "sys_info": {"dist": ["debian", "12", "bookworm"], "python": "3.11.2", "variant": "debian"},
        "v1": {
            "_beta_keys": ["subplatform"], "availability-zone": None, "availability_zone": None,
            "cloud-name": "unknown", "cloud_id": cloud, "cloud_name": "unknown", "distro": "debian",
            "instance-id": instance_id, "instance_id": instance_id, "local-hostname": "web1",
            "local_hostname": "web1", "platform": cloud, "public_ssh_keys": [], "region": None,
            "subplatform": "seed-dir (/var/lib/cloud/seed/nocloud)", "variant": "debian",
        },
    }


def nocloud(meta: dict[str, Any]) -> dict[str, Any]:
    return {"meta_data": {"dsmode": "local", "instance-id": "iid-web1", "local-hostname": "web1", **meta}}


def configdrive(meta: dict[str, Any]) -> dict[str, Any]:
    metadata = openstack_meta_data(meta)
    metadata.update({"instance-id": metadata["uuid"], "local-hostname": "web1"})
    return {"meta_data": metadata, "ec2_metadata": {}, "network_json": None}


def ec2(tags: dict[str, Any]) -> dict[str, Any]:
    return {"_metadata_api_version": "2021-03-23",
            "meta-data": {"instance-id": "i-0123456789abcdef0", "local-ipv4": "10.0.0.5",
                          "placement": {"availability-zone": "eu-west-1a"}, "tags": {"instance": tags}},
            "dynamic": {"instance-identity": {"document": {"region": "eu-west-1"}}}}


def write_instance_data(paths: Distro, data: dict[str, Any] | str | bytes) -> None:
    target = paths.cloud_init_instance_data
    target.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, dict):
        data = json.dumps(data, indent=1, sort_keys=True)
    target.write_bytes(data.encode() if isinstance(data, str) else data)


def write_user_data(paths: Distro, text: str, instance_id: str = "iid-web1") -> None:
    target = paths.cloud_init_user_data(instance_id)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)


@pytest.mark.parametrize("shape", ["nocloud", "configdrive", "ec2"])
def test_cloudinit_metadata(paths: Distro, shape: str) -> None:
    token = new_token()
    ds = {"nocloud": nocloud, "configdrive": configdrive, "ec2": ec2}[shape]({"imprint-token": token})
    write_instance_data(paths, instance_data(ds))
    found = ci.read(paths)
    assert found is not None and found.token.encode() == token


@pytest.mark.parametrize("text", [
    "#cloud-config\nimprint-token: {token}\n",
    "#cloud-config\n# a comment\npackages: [curl]\nimprint-token: '{token}'  # quoted\nruncmd:\n - [ls]\n",
    '#cloud-config\r\nhostname: web1\r\n"imprint-token": "{token}"\r\n',
    "#cloud-config\nimprint-token: |\n  {token}\nusers: []\n",
    "#cloud-config\nimprint-token: {token} # trailing comment",
])
def test_cloudinit_user_data(paths: Distro, text: str) -> None:
    token = new_token()
    write_instance_data(paths, instance_data(nocloud({})))
    write_user_data(paths, text.format(token=token))
    found = ci.read(paths)
    assert found is not None and found.token.encode() == token


@pytest.mark.parametrize("text", [
    "#cloud-config\nwrite_files:\n  - path: /x\n    content: |\n      imprint-token: {token}\n",
    "#!/bin/sh\nimprint-token: {token}\n",
    "#cloud-config-archive\nimprint-token: {token}\n",
    "#cloud-config\nimprint-tokens: {token}\n",
    "#cloud-config\n#imprint-token: {token}\n",
])
def test_cloudinit_user_data_without_a_top_level_key_is_absent(paths: Distro, text: str) -> None:
    write_instance_data(paths, instance_data(nocloud({})))
    write_user_data(paths, text.format(token=new_token()))
    assert ci.read(paths) is None


def test_cloudinit_user_data_of_another_instance_is_ignored(paths: Distro) -> None:
    # An image made from a booted VM keeps /var/lib/cloud/instances/<old id>: not this boot's.
    write_instance_data(paths, instance_data(nocloud({}), instance_id="iid-new"))
    write_user_data(paths, f"#cloud-config\nimprint-token: {new_token()}\n", instance_id="iid-old")
    assert ci.read(paths) is None


def test_cloudinit_missing_file_or_key_is_absent(paths: Distro) -> None:
    assert ci.read(paths) is None
    write_instance_data(paths, instance_data(nocloud({"role": "web"})))
    assert ci.read(paths) is None
    write_instance_data(paths, instance_data(configdrive({"role": "web"})))
    assert ci.read(paths) is None
    write_instance_data(paths, b"")  # cloud-init truncates before it writes
    assert ci.read(paths) is None


def test_cloudinit_corrupt_json_is_broken(paths: Distro) -> None:
    write_instance_data(paths, '{"ds": {"meta_data": {"imprint-token": "imprint1s-')
    with pytest.raises(ChannelBroken) as caught:
        ci.read(paths, reread_pause=0.01)
    assert caught.value.channel == "cloud-init"
    assert str(paths.cloud_init_instance_data) in caught.value.fault
    assert "invalid JSON" in caught.value.fault
    write_instance_data(paths, "[]")
    with pytest.raises(ChannelBroken, match="not an object"):
        ci.read(paths, reread_pause=0.01)


def test_cloudinit_file_being_written_is_absent(paths: Distro) -> None:
    # Half-written JSON that is complete when read again: the next poll reads the whole file.
    whole = json.dumps(instance_data(nocloud({"imprint-token": new_token()})))
    write_instance_data(paths, whole[:100])
    # cloud-init finishes its write during the pause before the second read.
    assert ci.read(paths, sleep=lambda _: write_instance_data(paths, whole)) is None
    assert ci.read(paths) is not None


@pytest.mark.parametrize(("ds", "fault"), [
    (nocloud({"imprint-token": "corrupt"}), "ds/meta_data/imprint-token: token is corrupt"),
    (configdrive({"imprint-token": "imprint9s-aaaa"}), "ds/meta_data/meta/imprint-token: token version 9"),
    (ec2({"imprint-token": ""}), "ds/meta-data/tags/instance/imprint-token: token is empty"),
    (nocloud({"imprint-token": ["x"]}), "ds/meta_data/imprint-token is list"),
])
def test_cloudinit_corrupt_token_is_broken(paths: Distro, ds: dict[str, Any], fault: str) -> None:
    if ds.get("meta_data", {}).get("imprint-token") == "corrupt":
        ds["meta_data"]["imprint-token"] = corrupt(new_token())
    write_instance_data(paths, instance_data(ds))
    with pytest.raises(ChannelBroken) as caught:
        ci.read(paths)
    assert fault in caught.value.fault


def test_cloudinit_corrupt_user_data_token_is_broken(paths: Distro) -> None:
    write_instance_data(paths, instance_data(nocloud({})))
    write_user_data(paths, f"#cloud-config\nimprint-token: {corrupt(new_token())}\n")
    with pytest.raises(ChannelBroken, match=r"user-data.txt \(#cloud-config imprint-token\): token is corrupt"):
        ci.read(paths)
    write_user_data(paths, f"#cloud-config\nimprint-token: {new_token()}\nimprint-token: {new_token()}\n")
    with pytest.raises(ChannelBroken, match="2 times with different values"):
        ci.read(paths)


def test_cloudinit_metadata_and_user_data_disagree(paths: Distro) -> None:
    token = new_token()
    write_instance_data(paths, instance_data(nocloud({"imprint-token": token})))
    write_user_data(paths, f"#cloud-config\nimprint-token: {token}\n")
    found = ci.read(paths)
    assert found is not None and found.token.encode() == token
    write_user_data(paths, f"#cloud-config\nimprint-token: {new_token()}\n")
    with pytest.raises(ChannelBroken, match="carry different tokens"):
        ci.read(paths)


def test_cloudinit_base64_encoded_value(paths: Distro) -> None:
    import base64

    token = new_token()
    data = instance_data(nocloud({"imprint-token": base64.b64encode(token.encode()).decode()}))
    data["base64_encoded_keys"] = ["ds/meta_data/imprint-token"]
    write_instance_data(paths, data)
    found = ci.read(paths)
    assert found is not None and found.token.encode() == token


# --- cloud-init instance data written by Debian's cloud-init itself ----------------------------


def run_cloudinit(root: Path, datasource: str, *extra: str) -> str:
    pytest.importorskip("cloudinit", reason="Debian's cloud-init (python3 cloudinit) is not installed")
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    result = subprocess.run([sys.executable, str(RUN_CLOUDINIT), str(root), datasource, *extra],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_real_cloudinit_nocloud_meta_data(tmp_path: Path) -> None:
    root = tmp_path / "root"
    seed = root / "var/lib/cloud/seed/nocloud"
    seed.mkdir(parents=True)
    token = new_token()
    (seed / "meta-data").write_text(f"instance-id: iid-web1\nlocal-hostname: web1\nimprint-token: {token}\n")
    (seed / "user-data").write_text("#cloud-config\npackages: [curl]\n")
    assert "datasource NoCloud iid-web1" in run_cloudinit(root, "NoCloud")
    found = ci.read(Distro(root))
    assert found is not None and found.token.encode() == token


def test_real_cloudinit_nocloud_user_data(tmp_path: Path) -> None:
    root = tmp_path / "root"
    seed = root / "var/lib/cloud/seed/nocloud"
    seed.mkdir(parents=True)
    token = new_token(TokenKind.NOSECRET)
    (seed / "meta-data").write_text("instance-id: iid-web1\n")
    (seed / "user-data").write_text(f"#cloud-config\nhostname: web1\nimprint-token: {token}\n")
    run_cloudinit(root, "NoCloud")
    found = ci.read(Distro(root))
    assert found is not None and found.token.encode() == token


def test_real_cloudinit_configdrive(tmp_path: Path) -> None:
    root = tmp_path / "root"
    latest = root / "var/lib/cloud/seed/config_drive/openstack/latest"
    latest.mkdir(parents=True)
    token = new_token()
    (latest / "meta_data.json").write_text(json.dumps(openstack_meta_data({"imprint-token": token})))
    assert "datasource ConfigDrive" in run_cloudinit(root, "ConfigDrive")
    found = ci.read(Distro(root))
    assert found is not None and found.token.encode() == token


def test_real_cloudinit_ec2_crawls_the_fake_service(tmp_path: Path) -> None:
    # cloud-init asks for IMDSv2 sessions only when it knows it runs on AWS (DMI), so this
    # EC2-compatible service allows IMDSv1; the crawled tree keeps the instance tags.
    root = tmp_path / "root"
    token = new_token()
    with FakeIMDS(Site(tag=token, require_session=False)) as fake:
        out = run_cloudinit(root, "Ec2", "--network", "--metadata-url", fake.url)
    assert "datasource Ec2 i-0123456789abcdef0" in out
    found = ci.read(Distro(root))
    assert found is not None and found.token.encode() == token


@pytest.mark.parametrize("mode", ["shared", "nosecret"])
def test_agent_binds_with_token_from_real_cloudinit(agents: AgentFactory, owner: Owner,
                                                    monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    monkeypatch.delenv(imds.BASE_URL_ENV, raising=False)
    root = agents.make_root(None)
    seed = root / "var/lib/cloud/seed/nocloud"
    seed.mkdir(parents=True)
    (seed / "meta-data").write_text("instance-id: iid-web1\n")
    (seed / "user-data").write_text(f"#cloud-config\nimprint-token: {owner.token('web1', mode)}\n")
    run_cloudinit(root, "NoCloud")
    agent = agents.start(root)
    assert "on cloud-init" in agent.log()
    args = ["bind", "web1", "--address", agent.address]
    if mode == "nosecret":
        args += ["--vm-token", agent.vm_token()]
    assert owner.json(*args)["mode"] == mode
