"""The DVC remote on S3: push to and pull from a local moto server, and restore an older dataset
version with `git checkout` + `dvc pull` after the local cache is gone."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import boto3
import pytest

from conftest import BIN, commit_all, sh

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def moto_url(tmp_path, monkeypatch):
    port = _free_port()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url + "/moto-api/data.json", timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "moto did not start"
                time.sleep(0.2)
        boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(Bucket="dvc-remote")
        yield url
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(10)


def test_push_pull_and_restore_an_older_version(tiny_project: Path, moto_url: str):
    dvc = str(BIN / "dvc")
    sh([dvc, "remote", "add", "-d", "storage", "s3://dvc-remote/tiny"], tiny_project)
    sh([dvc, "remote", "modify", "storage", "endpointurl", moto_url], tiny_project)
    sh([dvc, "repro", "-q"], tiny_project)
    v1 = commit_all(tiny_project, "v1")
    sh([dvc, "push", "-q"], tiny_project)
    keys = boto3.client("s3", endpoint_url=moto_url).list_objects_v2(Bucket="dvc-remote")["KeyCount"]
    assert keys >= 3  # corpus file, its .dir listing, the stage outputs

    (tiny_project / "data/corpus.txt").write_text("version two of the corpus\n")
    sh([dvc, "add", "-q", "data"], tiny_project)
    sh([dvc, "repro", "-q"], tiny_project)
    commit_all(tiny_project, "v2")
    sh([dvc, "push", "-q"], tiny_project)

    shutil.rmtree(tiny_project / ".dvc" / "cache")  # only the remote has the data now
    shutil.rmtree(tiny_project / "data")
    shutil.rmtree(tiny_project / "outputs")
    sh(["git", "checkout", "-q", v1], tiny_project)
    sh([dvc, "pull", "-q"], tiny_project)
    assert (tiny_project / "data/corpus.txt").read_text() == "one two three\n"
    assert (tiny_project / "outputs/count/result.txt").read_text() == "3 words, seed 0\n"
    sh(["git", "checkout", "-q", "main"], tiny_project)
    sh([dvc, "pull", "-q"], tiny_project)
    assert (tiny_project / "data/corpus.txt").read_text() == "version two of the corpus\n"
