"""Ingest from s3:// sources through a real (local) moto S3 server, configured only by AWS env."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from ingest_helpers import cfg, image_bytes, make_tar, manifest, reasons_by_ref

from components import ingest, storage
from components.formats import SourceSpec


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def bucket(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, object]]:
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    for key, value in {"AWS_ENDPOINT_URL_S3": url, "AWS_ENDPOINT_URL": url,
                       "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    storage._client.cache_clear()  # the client reads the environment once per process
    client = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
    client.create_bucket(Bucket="corpus")
    try:
        yield "corpus", client
    finally:
        storage._client.cache_clear()
        server.stop()


@pytest.mark.integration
def test_ingest_from_s3(bucket: tuple[str, object], tmp_path: Path) -> None:
    name, s3 = bucket
    put = s3.put_object  # type: ignore[attr-defined]
    put(Bucket=name, Key="web/images/a.png", Body=image_bytes(seed=1))
    put(Bucket=name, Key="web/images/b.jpg", Body=image_bytes(seed=2, fmt="JPEG"))
    rows = [{"image": "images/a.png", "caption": "from s3"},
            {"image": "images/b.jpg", "caption": "a jpeg"},
            {"image": "images/missing.png", "caption": "not there"}]  # fmt: skip
    put(Bucket=name, Key="web/web.json", Body=json.dumps(rows).encode())
    tar = make_tar(tmp_path / "0.tar", [("k1", {"png": image_bytes(seed=3), "txt": b"in a tar"})])
    put(Bucket=name, Key="shards/00000.tar", Body=tar.read_bytes())

    out = tmp_path / "out"
    specs = [SourceSpec(f"s3://{name}/web/web.json"), SourceSpec(f"s3://{name}/shards/")]
    summary = ingest.run(specs, out, cfg())
    df = manifest(out)
    assert sorted(zip(df["image_key"], df["caption"], strict=True)) == [
        ("images/a.png", "from s3"), ("images/b.jpg", "a jpeg"), ("k1", "in a tar")]  # fmt: skip
    assert reasons_by_ref(out) == {f"s3://{name}/web/web.json:2": "missing_file"}
    assert [s["format"] for s in summary.sources] == ["blip", "webdataset"]


@pytest.mark.integration
def test_missing_s3_annotation_is_a_source_error(bucket: tuple[str, object], tmp_path: Path) -> None:
    from components.errors import CapfiltError

    name, _ = bucket
    with pytest.raises(CapfiltError, match=f"s3://{name}/nope.json: source file not found"):
        ingest.run([SourceSpec(f"s3://{name}/nope.json")], tmp_path / "out", cfg())
    assert not (tmp_path / "out").exists()
