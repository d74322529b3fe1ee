"""The local stack (infra/stack.py) with real processes: moto, an MLflow server whose artifacts go
to S3 on moto, and a Prefect server; then `capfilt schedule` served against that server, its cron
read back through the client, and one triggered run completing. Everything stops afterwards."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _load_stack():
    spec = importlib.util.spec_from_file_location("capfilt_infra_stack_test", ROOT / "infra" / "stack.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    module = _load_stack()
    home = tmp_path_factory.mktemp("stack")
    ports = {s: module.free_port() for s in module.SERVICES}
    saved = dict(os.environ)
    try:
        info = module.up(home, ports=ports)
        client_home = home / "client_home"
        client_home.mkdir()
        os.environ.update(module.client_env(info), AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                          PREFECT_HOME=str(client_home))
        yield module, home, info
    finally:
        os.environ.clear()
        os.environ.update(saved)
        module.down(home)


def test_stack_serves_on_loopback_and_mlflow_stores_artifacts_on_s3(stack, tmp_path):
    module, home, info = stack
    assert {s for s, v in module.status(home).items() if v["running"]} == {"moto", "mlflow", "prefect"}
    assert all(v["url"].startswith("http://127.0.0.1:") for v in info.values())
    import mlflow

    mlflow.set_tracking_uri(info["mlflow"]["url"])
    (tmp_path / "note.txt").write_text("stored on S3")
    mlflow.set_experiment("stack-test")
    with mlflow.start_run() as run:
        mlflow.log_metric("x", 1.0)
        mlflow.log_artifact(str(tmp_path / "note.txt"))
    s3 = boto3.client("s3", endpoint_url=info["moto"]["url"], region_name="us-east-1")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="mlflow-artifacts").get("Contents", [])]
    assert any(k.endswith(f"{run.info.run_id}/artifacts/note.txt") for k in keys), keys


def test_schedule_serves_a_cron_deployment_and_a_triggered_run_completes(stack, tmp_path):
    module, home, info = stack
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "serve_home"), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    (tmp_path / "serve_home").mkdir()
    log = (tmp_path / "serve.log").open("w")
    serve = subprocess.Popen([str(BIN / "capfilt"), "schedule", "--cron", "0 3 * * 1", "--name", "weekly",
                              "--dry-run"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        import asyncio

        from prefect import get_client
        from prefect.deployments import run_deployment
        from prefect.settings import PREFECT_API_URL, temporary_settings

        async def read():
            async with get_client() as client:
                for _ in range(240):
                    try:
                        return await client.read_deployment_by_name("capfilt-pipeline/weekly")
                    except Exception:  # noqa: BLE001 - not registered yet
                        assert serve.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                        await asyncio.sleep(0.5)
            raise AssertionError("deployment never appeared")

        # Prefect may have been imported earlier in this session with another API: pin this one.
        with temporary_settings(updates={PREFECT_API_URL: info["prefect"]["url"] + "/api"}):
            deployment = asyncio.run(read())
            assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in deployment.schedules] == [
                ("0 3 * * 1", "UTC", True)]
            assert deployment.parameters["dry_run"] is True
            flow_run = run_deployment(name="capfilt-pipeline/weekly", timeout=180)
            assert flow_run.state.is_completed(), flow_run.state
    finally:
        module.stop_group(serve.pid)
        log.close()
