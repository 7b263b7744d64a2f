"""Security: Redis AUTH, ACL users and TLS through the URL; nothing from the queue, the corpus or
a model folder is unpickled or evaluated; snapshot names and manifest paths cannot leave the
root; the status page binds 127.0.0.1; reply keys stay under the prefix.

Redis servers here are private `redis-server` processes on free ports; the worker is the real
consumer loop in a thread, building its own client from the URL as `twinq worker` does.
"""

from __future__ import annotations

import ast
import datetime as dt
import ipaddress
import json
import logging
import pickle
import shutil
import socket
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from twinq.shared import snapshot as snap
from twinq.shared.cli import main as twinq
from twinq.shared.config import load_settings
from twinq.shared.errors import BadInput, ModelLoadError, SnapshotInvalid
from tests.reliability.conftest import TEXTS, make_settings
from tests.reliability.harness import REDIS_SERVER, REPO, request_payload, xadd_many
from tests.worker.conftest import running_worker, sample, wait_reply, wait_until
from twinq.worker.client import TwinqClient

SOURCE_DIRS = ("shared", "worker", "pipelines")


def _ask(url: str, settings: Any, timeout_s: float = 60) -> dict[str, Any]:
    with TwinqClient(url, settings) as client:
        return client.ask(TEXTS[0], top_k=3, timeout_s=timeout_s)


def _serves(url: str, root: Path, models: tuple[Any, Any]) -> dict[str, Any]:
    """Run a worker on `url` (its client built from the URL) and ask it one question."""
    settings = make_settings(url, root)
    with running_worker(settings, bi_encoder=models[0], cross_encoder=models[1]):
        return _ask(url, settings)


def _auth_failure_logged(url: str, root: Path, caplog: pytest.LogCaptureFixture) -> str:
    """One pass of a worker loop on `url`: no exception, a warning saying why, back-off."""
    from twinq.worker.consumer import Consumer
    from twinq.worker.engine import Engine

    settings = make_settings(url, root)
    consumer = Consumer(settings, Engine(settings), worker_id="intruder")
    consumer.max_connection_wait_s = 0.05
    with caplog.at_level(logging.WARNING, logger="twinq.worker.consumer"):
        assert consumer.run_once() == 0
    consumer.queue.close()
    return "\n".join(r.getMessage() for r in caplog.records if "intruder" in r.getMessage())


def test_requirepass_url_serves_and_wrong_password_fails_clearly(
        redis_server: Any, rel_snapshot: Any, rel_bi_encoder: Any, rel_cross_encoder: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    server = redis_server(args=["--requirepass", "pw-Only-4-tests"], url_auth=":pw-Only-4-tests@")
    root, version = rel_snapshot()
    reply = _serves(server.url, root, (rel_bi_encoder, rel_cross_encoder))
    assert reply["ok"] and reply["snapshot"] == version
    wrong = server.url.replace("pw-Only-4-tests", "wrong-password")
    with pytest.raises(redis.AuthenticationError, match="invalid username-password pair"):
        _ask(wrong, make_settings(wrong, root), timeout_s=1)
    anonymous = server.url.replace(":pw-Only-4-tests@", "")
    with pytest.raises(redis.AuthenticationError, match="authenticat"):
        _ask(anonymous, make_settings(anonymous, root), timeout_s=1)
    logged = _auth_failure_logged(wrong, root, caplog)
    assert "Redis unavailable (invalid username-password pair" in logged
    assert "wrong-password" not in logged


ACL = ["--user", "default", "off",
       "--user", "twinq-app", "on", ">app-Secret-9", "~twinq:*", "resetchannels", "+@all",
       "-@dangerous"]


def test_acl_user_url_serves_and_wrong_password_fails_clearly(
        redis_server: Any, rel_snapshot: Any, rel_bi_encoder: Any, rel_cross_encoder: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    """An ACL user confined to `twinq:*` keys, without dangerous commands, is enough for both
    the worker and the client; the default user is off."""
    server = redis_server(args=ACL, url_auth="twinq-app:app-Secret-9@")
    root, version = rel_snapshot()
    reply = _serves(server.url, root, (rel_bi_encoder, rel_cross_encoder))
    assert reply["ok"] and reply["snapshot"] == version
    wrong = server.url.replace("app-Secret-9", "guess")
    with pytest.raises(redis.AuthenticationError, match="invalid username-password pair"):
        _ask(wrong, make_settings(wrong, root), timeout_s=1)
    logged = _auth_failure_logged(wrong, root, caplog)
    assert "invalid username-password pair" in logged and "guess" not in logged
    with server.client() as admin:  # the app user cannot reach outside its keys
        with pytest.raises(redis.exceptions.NoPermissionError):
            admin.set("outside:key", "x")


def test_ask_cli_does_not_print_the_password_when_redis_is_down(
        capsys: pytest.CaptureFixture[str]) -> None:
    from tests.reliability.harness import free_port

    url = f"redis://twinq-app:Do-Not-Print-Me@127.0.0.1:{free_port()}/0"
    code = twinq(["ask", "how do I reset my password", "--redis-url", url, "--timeout", "1"])
    err = capsys.readouterr().err
    assert code == 1 and "cannot reach Redis" in err
    assert "Do-Not-Print-Me" not in err


def _tls_files(folder: Path) -> dict[str, Path]:
    """A CA and a server certificate for 127.0.0.1 (cryptography), written as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.timezone.utc)

    def cert(subject: str, key: Any, issuer: str, signer: Any, ca: bool) -> x509.Certificate:
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5))
                   .not_valid_after(now + dt.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(
        ec.SECP256R1())
    ca = cert("twinq test CA", ca_key, "twinq test CA", ca_key, True)
    server = cert("127.0.0.1", server_key, "twinq test CA", ca_key, False)
    pem = serialization.Encoding.PEM
    files = {"ca": folder / "ca.pem", "cert": folder / "server.pem", "key": folder / "key.pem"}
    folder.mkdir(parents=True, exist_ok=True)
    files["ca"].write_bytes(ca.public_bytes(pem))
    files["cert"].write_bytes(server.public_bytes(pem))
    files["key"].write_bytes(server_key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return files


def _redis_has_tls() -> str | None:
    """None if this redis-server was built with TLS, else why not."""
    if not Path(REDIS_SERVER).exists():
        return f"no redis-server at {REDIS_SERVER}"
    out = subprocess.run([REDIS_SERVER, "--version"], capture_output=True, text=True, timeout=10)
    libs = subprocess.run(["ldd", str(Path(REDIS_SERVER).resolve())], capture_output=True,
                          text=True, timeout=10).stdout if shutil.which("ldd") else ""
    if "libssl" not in libs and "tls" not in out.stdout.lower():
        return f"{out.stdout.strip()} does not link OpenSSL (built without TLS)"
    return None


def test_tls_url_serves_and_untrusted_or_plain_connections_fail(
        redis_server: Any, rel_snapshot: Any, rel_bi_encoder: Any, rel_cross_encoder: Any,
        tmp_path: Path) -> None:
    reason = _redis_has_tls()
    if reason:
        pytest.skip(reason)
    files = _tls_files(tmp_path / "tls")
    server = redis_server(tls=True, args=[
        "--tls-cert-file", str(files["cert"]), "--tls-key-file", str(files["key"]),
        "--tls-ca-cert-file", str(files["ca"]), "--tls-auth-clients", "no"])
    root, version = rel_snapshot()
    url = f"{server.url}?ssl_ca_certs={files['ca']}&ssl_cert_reqs=required"
    reply = _serves(url, root, (rel_bi_encoder, rel_cross_encoder))
    assert reply["ok"] and reply["snapshot"] == version
    with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
        redis.Redis.from_url(server.url, socket_connect_timeout=5).ping()  # system CAs only
    with pytest.raises((redis.ConnectionError, redis.TimeoutError)):
        redis.Redis.from_url(server.url.replace("rediss://", "redis://"),
                             socket_connect_timeout=5, socket_timeout=5).ping()


# --- nothing is unpickled or evaluated -----------------------------------------------------

def _unsafe_calls(tree: ast.AST) -> list[tuple[int, str]]:
    """Calls that can run code from data: pickle/marshal/dill loads, eval/exec/compile,
    yaml.load without a safe loader, torch.load without weights_only=True, and
    trust_remote_code=True anywhere."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = (func.id if isinstance(func, ast.Name) else
                f"{ast.unparse(func.value)}.{func.attr}" if isinstance(func, ast.Attribute)
                else "")
        keywords = {k.arg: k.value for k in node.keywords}
        if name in ("eval", "exec", "compile", "__import__"):
            found.append((node.lineno, name))
        elif name.split(".")[0] in ("pickle", "cPickle", "marshal", "dill", "shelve",
                                    "cloudpickle", "joblib") and "load" in name:
            found.append((node.lineno, name))
        elif name.endswith("Unpickler"):
            found.append((node.lineno, name))
        elif name == "yaml.load" and "SafeLoader" not in ast.unparse(
                keywords.get("Loader", ast.Constant(""))):
            found.append((node.lineno, name))
        elif name == "torch.load" and not (isinstance(keywords.get("weights_only"), ast.Constant)
                                          and keywords["weights_only"].value is True):
            found.append((node.lineno, name))
        trust = keywords.get("trust_remote_code")
        if trust is not None and not (isinstance(trust, ast.Constant) and trust.value is False):
            found.append((node.lineno, "trust_remote_code=" + ast.unparse(trust)))
    return found


def test_source_tree_never_unpickles_or_evaluates() -> None:
    files = sorted(p for d in SOURCE_DIRS for p in (REPO / d).rglob("*.py"))
    assert len(files) > 20
    unsafe = {str(p.relative_to(REPO)): hits for p in files
              if (hits := _unsafe_calls(ast.parse(p.read_text(encoding="utf-8"))))}
    assert unsafe == {}
    texts = "\n".join(p.read_text(encoding="utf-8") for p in files)
    assert "trust_remote_code=True" not in texts and "pickle.load" not in texts


def test_unsafe_call_scanner_finds_what_it_looks_for() -> None:
    bad = ("import pickle, yaml, torch\npickle.loads(b'')\neval('1')\nexec('x=1')\n"
           "yaml.load(s)\ntorch.load(f)\nf(trust_remote_code=True)\nmodel.eval()\n"
           "yaml.load(s, Loader=yaml.SafeLoader)\ntorch.load(f, weights_only=True)\n")
    assert [n for _, n in _unsafe_calls(ast.parse(bad))] == [
        "pickle.loads", "eval", "exec", "yaml.load", "torch.load", "trust_remote_code=True"]


class _Trap:
    """Unpickling this creates `path`: proof that a pickle from a model folder was loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


def _pickle_only_model(folder: Path, base: str, trap: Path) -> Path:
    """A model folder whose weights exist only as a (hostile) pytorch_model.bin."""
    shutil.copytree(base, folder)
    for weights in folder.rglob("*.safetensors"):
        with (weights.parent / "pytorch_model.bin").open("wb") as fh:
            pickle.dump({"weights": _Trap(trap)}, fh)
        weights.unlink()
    return folder


@pytest.mark.parametrize("kind", ["bi_encoder", "cross_encoder"])
def test_model_folder_with_only_pickled_weights_is_refused(
        kind: str, tiny_bi_encoder_path: str, tiny_cross_encoder_path: str,
        tmp_path: Path) -> None:
    from twinq.shared.models import load_bi_encoder, load_cross_encoder

    trap = tmp_path / "unpickled"
    base = tiny_bi_encoder_path if kind == "bi_encoder" else tiny_cross_encoder_path
    folder = _pickle_only_model(tmp_path / "model", base, trap)
    load = load_bi_encoder if kind == "bi_encoder" else load_cross_encoder
    with pytest.raises(ModelLoadError, match="safetensors"):
        load(str(folder))
    assert not trap.exists(), "a pickle from the model folder was executed"


def test_model_folder_prefers_safetensors_over_a_hostile_pickle(tiny_bi_encoder_path: str,
                                                                 tmp_path: Path) -> None:
    from twinq.shared.models import load_bi_encoder

    trap = tmp_path / "unpickled"
    folder = tmp_path / "model"
    shutil.copytree(tiny_bi_encoder_path, folder)
    for weights in list(folder.rglob("*.safetensors")):
        with (weights.parent / "pytorch_model.bin").open("wb") as fh:
            pickle.dump({"weights": _Trap(trap)}, fh)
    model = load_bi_encoder(str(folder))
    assert model.encode(["reset my password"]).shape == (1, 32)
    assert not trap.exists()


# --- snapshot names and paths stay under the root ------------------------------------------

HOSTILE_VERSIONS = ["../outside", "..", "/etc", "20261128T031500Z/../../outside",
                    "20261128T031500Z\n", "20261128T031500Z\x00", "２０２６１１２８T031500Z", "",
                    "20261128T031500Z/", "snapshots/20261128T031500Z", "~/20261128T031500Z"]


@pytest.mark.parametrize("version", HOSTILE_VERSIONS)
def test_hostile_version_names_are_refused(version: str, rel_snapshot: Any,
                                           tmp_path: Path) -> None:
    root, good = rel_snapshot()
    outside = tmp_path / "outside"
    outside.mkdir()
    before = (root / snap.CURRENT).read_text()
    calls = [lambda: snap.check_version(version), lambda: snap.publish(root, version),
             lambda: snap.version_dir(root, version)]
    if version:  # load_snapshot(root, "") means "the published one"
        calls.append(lambda: snap.load_snapshot(root, version))
    for call in calls:
        with pytest.raises((BadInput, snap.SnapshotNotFound)):
            call()
    assert (root / snap.CURRENT).read_text() == before and not any(outside.iterdir())
    assert twinq(["index", "publish", version, "--root", str(root)]) == 2


def test_hostile_current_and_history_are_ignored(rel_snapshot: Any, rel_bi_encoder: Any,
                                                 tmp_path: Path) -> None:
    root, v1 = rel_snapshot()
    _, v2 = rel_snapshot()
    (root / snap.HISTORY).write_text(f"{v1}\n../../outside\n/etc/passwd\n{v2}\n")
    assert snap.rollback(root) == v1
    (root / snap.CURRENT).write_text("../../outside\n")
    with pytest.raises(BadInput, match="invalid snapshot version"):
        snap.load_snapshot(root)
    from twinq.worker.engine import Engine
    from twinq.worker.metrics import WorkerMetrics

    metrics = WorkerMetrics()
    engine = Engine(load_settings(env={}, overrides={"root": str(root)}), metrics=metrics,
                    bi_encoder=rel_bi_encoder)
    engine.start(watch=False)
    assert engine.version is None
    assert sample(metrics, "twinq_reloads_total", result="failure") == 1


def test_manifest_naming_files_outside_the_version_is_refused(rel_snapshot: Any,
                                                              tmp_path: Path) -> None:
    """A manifest is data too: its file names must not walk out of the version folder, even
    with checksums that match the files they point at."""
    root, v1 = rel_snapshot()
    _, v2 = rel_snapshot(publish=False)
    outside = tmp_path / "outside"
    outside.mkdir()
    folder = snap.version_dir(root, v2)
    manifest = json.loads((folder / snap.MANIFEST).read_text())
    entry = manifest["shards"][0]
    moved = outside / entry["index_file"]
    shutil.move(folder / entry["index_file"], moved)
    for hostile in (f"../../../outside/{moved.name}", str(moved)):
        entry["index_file"] = hostile
        (folder / snap.MANIFEST).write_text(json.dumps(manifest))
        with pytest.raises(SnapshotInvalid, match="not a file of the version folder"):
            snap.load_snapshot(root, v2)
        with pytest.raises(SnapshotInvalid, match="not a file of the version folder"):
            snap.publish(root, v2)
    assert snap.current_version(root) == v1


# --- the status page and the reply keys -----------------------------------------------------

def _non_loopback_ipv4() -> str | None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("10.255.255.255", 1))  # no packet is sent; picks the outgoing address
            address = probe.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") else address


def test_status_page_binds_loopback_by_default(module_redis: Any, rel_snapshot: Any,
                                               rel_bi_encoder: Any) -> None:
    from twinq.worker.status import StatusServer

    root, _ = rel_snapshot()
    settings = make_settings(module_redis.url, root)
    assert load_settings(env={}).metrics_host == "127.0.0.1" == settings.metrics_host
    with running_worker(settings, bi_encoder=rel_bi_encoder) as consumer:
        server = StatusServer(consumer, port=0).start()
        try:
            assert server._server is not None
            assert server._server.server_address[0] == "127.0.0.1"
            other = _non_loopback_ipv4()
            if other:
                with pytest.raises(OSError):
                    socket.create_connection((other, server.port), timeout=2).close()
        finally:
            server.stop()


@pytest.mark.parametrize("reply_to", ["twinq:queries", "other:key", "STREAM", "twinq:done:x",
                                      "twinq:worker:x", "twinq:reply:"])
def test_reply_to_outside_the_prefix_is_refused_and_nothing_written(
        reply_to: str, module_redis: Any, rel_snapshot: Any, rel_bi_encoder: Any) -> None:
    root, _ = rel_snapshot()
    settings = make_settings(module_redis.url, root)
    client = module_redis.client()
    key = settings.stream if reply_to == "STREAM" else reply_to
    rid = f"sec-{uuid.uuid4().hex[:10]}"
    with running_worker(settings, bi_encoder=rel_bi_encoder):
        xadd_many(client, settings.stream,
                  [request_payload(rid, TEXTS[0], reply_to=key)])
        reply = wait_reply(client, f"twinq:reply:{rid}", 60)
        wait_until(lambda: client.xpending(settings.stream, settings.group)["pending"] == 0)
    assert not reply["ok"] and reply["error"]["code"] == "bad_request"
    assert "reply_to must start with 'twinq:reply:'" in reply["error"]["message"]
    # The request stream stays a stream; the other keys never appear.
    assert client.type(key) == (b"stream" if reply_to == "STREAM" else b"none")
