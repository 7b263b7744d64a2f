"""The S3 test server (SeaweedFS, tests/object_store.py) and the S3 semantics twinq relies on.

Snapshot publishing on object storage rests on conditional writes: `IfMatch` (replace only the
version we read) and `mode="create"` (If-None-Match: write only if absent). These tests prove
the server honours them, including under a race, so that a green test of the store code means
something. They also prove the outage helpers work (a hung store and a refusing store), which
the worker's "keep serving, recover by itself" tests use.
"""

from __future__ import annotations

import threading
import time

import fsspec
import pytest
from botocore.exceptions import EndpointConnectionError

from tests.object_store import SeaweedS3

PRECONDITION_FAILED = "pre-conditions you specified did not hold"


def _fs_and_path(root: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem configured by the AWS_* environment only, as production code gets it."""
    return fsspec.core.url_to_fs(root)


def test_root_is_fresh_and_env_points_at_the_server(s3_root: str, s3_server: SeaweedS3) -> None:
    fs, path = _fs_and_path(s3_root)
    assert s3_root.startswith("s3://twinq-test/")
    assert fs.find(path) == []
    fs.pipe_file(f"{path}/probe", b"x")
    # The same object through an explicitly configured client: the env reached the server.
    assert s3_server.filesystem().cat_file(f"{path}/probe") == b"x"


def test_write_read_list_delete(s3_root: str) -> None:
    fs, path = _fs_and_path(s3_root)
    fs.pipe_file(f"{path}/v1/a.bin", b"alpha")
    fs.pipe_file(f"{path}/v1/sub/b.bin", b"beta")
    fs.pipe_file(f"{path}/CURRENT", b"v1")

    assert fs.cat_file(f"{path}/v1/a.bin") == b"alpha"
    assert fs.cat_file(f"{path}/v1/a.bin", start=1, end=3) == b"lp"
    assert sorted(fs.find(path)) == [f"{path}/CURRENT", f"{path}/v1/a.bin", f"{path}/v1/sub/b.bin"]
    assert sorted(fs.ls(path, detail=False)) == [f"{path}/CURRENT", f"{path}/v1"]
    assert fs.info(f"{path}/v1/a.bin")["size"] == 5

    fs.rm(f"{path}/v1", recursive=True)
    fs.invalidate_cache()
    assert fs.find(path) == [f"{path}/CURRENT"]
    assert not fs.exists(f"{path}/v1/a.bin")
    with pytest.raises(FileNotFoundError):
        fs.cat_file(f"{path}/v1/a.bin")
    # Not asserted: SeaweedFS keeps the emptied "directory" v1/ in delimiter listings
    # (`fs.ls(path)`), which AWS does not. Code must not take a listed prefix for a version.


def test_missing_bucket_fails_like_aws(s3_root: str) -> None:
    # weed runs with -s3.autoCreateBucket=false: its default would create the bucket silently.
    fs, _ = _fs_and_path(s3_root)
    with pytest.raises(FileNotFoundError):
        fs.pipe_file("twinq-no-such-bucket/key", b"x")


def test_if_match_rejects_a_stale_etag_and_accepts_the_current_one(s3_root: str) -> None:
    fs, path = _fs_and_path(s3_root)
    key = f"{path}/CURRENT"
    fs.pipe_file(key, b"v1")
    first = fs.info(key, refresh=True)["ETag"]
    fs.pipe_file(key, b"v2", IfMatch=first)
    second = fs.info(key, refresh=True)["ETag"]
    assert second != first

    with pytest.raises(OSError, match=PRECONDITION_FAILED):
        fs.pipe_file(key, b"v3", IfMatch=first)  # stale
    assert fs.cat_file(key) == b"v2"
    fs.pipe_file(key, b"v3", IfMatch=second)
    assert fs.cat_file(key) == b"v3"


def test_create_mode_refuses_an_existing_key(s3_root: str) -> None:
    fs, path = _fs_and_path(s3_root)
    fs.pipe_file(f"{path}/LOCK", b"first", mode="create")
    with pytest.raises(OSError, match=PRECONDITION_FAILED):
        fs.pipe_file(f"{path}/LOCK", b"second", mode="create")
    assert fs.cat_file(f"{path}/LOCK") == b"first"


def test_racing_conditional_swaps_have_exactly_one_winner(s3_root: str, s3_server: SeaweedS3) -> None:
    # Two clients (separate connection pools) swap one key from the same ETag at the same time.
    clients = [s3_server.filesystem(), s3_server.filesystem()]
    key = f"{s3_root.removeprefix('s3://')}/CURRENT"
    clients[0].pipe_file(key, b"start")
    for round_ in range(5):
        etag = clients[0].info(key, refresh=True)["ETag"]
        barrier = threading.Barrier(len(clients))
        won: list[int] = []
        lost: list[BaseException] = []

        def swap(i: int) -> None:
            barrier.wait()
            try:
                clients[i].pipe_file(key, f"{round_}-{i}".encode(), IfMatch=etag)
                won.append(i)
            except OSError as exc:
                lost.append(exc)

        threads = [threading.Thread(target=swap, args=(i,)) for i in range(len(clients))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert len(won) == 1, (round_, won, lost)
        assert len(lost) == 1 and PRECONDITION_FAILED in str(lost[0]), lost
        assert clients[0].cat_file(key) == f"{round_}-{won[0]}".encode()


def test_paused_server_times_out_and_recovers(s3_root: str, s3_server: SeaweedS3) -> None:
    fs = s3_server.filesystem(timeout=1)
    key = f"{s3_root.removeprefix('s3://')}/CURRENT"
    fs.pipe_file(key, b"v1")
    with s3_server.paused():
        assert s3_server.is_paused
        started = time.monotonic()
        with pytest.raises(OSError):  # botocore ReadTimeoutError is an OSError
            fs.cat_file(key)
        assert time.monotonic() - started < 5
    assert not s3_server.is_paused
    assert fs.cat_file(key) == b"v1"  # the same client, no reconnect needed
    fs.pipe_file(key, b"v2")
    assert fs.cat_file(key) == b"v2"


def test_crashed_server_refuses_and_restarts_with_its_data(s3_root: str,
                                                           s3_server: SeaweedS3) -> None:
    fs = s3_server.filesystem(timeout=1)
    key = f"{s3_root.removeprefix('s3://')}/CURRENT"
    fs.pipe_file(key, b"kept")
    endpoint = s3_server.endpoint
    with s3_server.down():
        started = time.monotonic()
        # Connection refused is botocore's EndpointConnectionError, which is NOT an OSError:
        # code that must survive an unreachable store cannot catch OSError alone.
        with pytest.raises(EndpointConnectionError):
            fs.cat_file(key)
        assert time.monotonic() - started < 5
    assert s3_server.endpoint == endpoint
    assert fs.cat_file(key) == b"kept"
