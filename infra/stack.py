"""The local service stack: moto (S3 API), an MLflow server with S3 artifacts, a Prefect server.

`up(home)` starts each service as its own process group bound to 127.0.0.1 on a free (or given)
port, writes `<home>/<service>.pid`, `<service>.log` and `stack.json` (ports and URLs), creates the
buckets, and polls each health endpoint until it answers, failing fast with the log tail when a
process dies. `down(home)` stops the groups in reverse order (Prefect, MLflow, moto) with SIGTERM,
then SIGKILL after a grace period. `client_env(info)` is what clients export to use the stack.
Used by `capfilt stack up/down/status` and by the integration tests; this module has no project
imports so it also runs as `python infra/stack.py up|down|status`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

SERVICES = ("moto", "mlflow", "prefect")
BUCKETS = ("mlflow-artifacts", "dvc-remote")
DEFAULT_PORTS = {"moto": 5555, "mlflow": 5000, "prefect": 4200}
HEALTH = {"moto": "/moto-api/data.json", "mlflow": "/health", "prefect": "/api/health"}
QUIET = {"DO_NOT_TRACK": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
         "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
         "DVC_NO_ANALYTICS": "1", "AWS_DEFAULT_REGION": "us-east-1"}
TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}  # moto only


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _argv(service: str, port: int, home: Path, s3_url: str) -> list[str]:
    if service == "moto":
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    if service == "mlflow":
        return [_bin("mlflow"), "server", "--backend-store-uri", f"sqlite:///{home.resolve()}/mlflow.db",
                "--artifacts-destination", "s3://mlflow-artifacts/mlartifacts",
                "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    return [_bin("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port),
            "--analytics-off", "--no-ui"]


def _env(service: str, home: Path, s3_url: str) -> dict[str, str]:
    env = {**os.environ, **QUIET}
    for key, value in TEST_CREDENTIALS.items():
        env.setdefault(key, value)
    if service == "mlflow":
        env["MLFLOW_S3_ENDPOINT_URL"] = s3_url
    if service == "prefect":
        env["PREFECT_HOME"] = str((home / "prefect_home").resolve())
        env.pop("PREFECT_API_URL", None)
        (home / "prefect_home").mkdir(parents=True, exist_ok=True)
    return env


def log_path(home: Path, service: str) -> Path:
    """Where a service's output goes."""
    return home / f"{service}.log"


def _spawn(service: str, port: int, home: Path, s3_url: str) -> subprocess.Popen:
    log = log_path(home, service).open("w")
    proc = subprocess.Popen(_argv(service, port, home, s3_url), stdout=log, stderr=subprocess.STDOUT,
                            env=_env(service, home, s3_url), start_new_session=True, cwd=home)
    (home / f"{service}.pid").write_text(str(proc.pid))
    return proc


def wait_ready(url: str, timeout: float, proc: subprocess.Popen | None, log: Path) -> None:
    """Poll `url` until HTTP 200; a dead process or the timeout raises with the log tail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited with {proc.returncode}\n{_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{url} not ready after {timeout:.0f} s\n{_tail(log)}")


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:] if log.is_file() else "(no log)"


def create_buckets(s3_url: str) -> None:
    import boto3
    from botocore.config import Config

    s3 = boto3.client("s3", endpoint_url=s3_url, region_name="us-east-1",
                      aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID", "testing"),
                      aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY", "testing"),
                      config=Config(connect_timeout=5, retries={"max_attempts": 2}))
    existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
    for bucket in BUCKETS:
        if bucket not in existing:
            s3.create_bucket(Bucket=bucket)


def up(home: Path, services: tuple[str, ...] = SERVICES, ports: dict[str, int] | None = None,
       timeout: float = 120.0) -> dict[str, Any]:
    """Start the services not yet running; returns {service: {port, url, pid}}."""
    home.mkdir(parents=True, exist_ok=True)
    if "mlflow" in services:  # its artifacts live on moto's S3
        services = tuple(services) + ("moto",)
    info = status(home)
    wanted = [s for s in SERVICES if s in services and not info.get(s, {}).get("running")]
    chosen = dict(ports or {})
    for s in wanted:
        chosen.setdefault(s, DEFAULT_PORTS[s] if _port_free(DEFAULT_PORTS[s]) else free_port())
    s3_url = info.get("moto", {}).get("url") or f"http://127.0.0.1:{chosen.get('moto', 0)}"
    procs = {}
    if "moto" in wanted:
        procs["moto"] = _spawn("moto", chosen["moto"], home, s3_url)
        wait_ready(s3_url + HEALTH["moto"], 30, procs["moto"], log_path(home, "moto"))
    if "mlflow" in services:
        create_buckets(s3_url)
    for s in ("mlflow", "prefect"):  # both start in parallel, then both are polled
        if s in wanted:
            procs[s] = _spawn(s, chosen[s], home, s3_url)
    for s, proc in procs.items():
        url = f"http://127.0.0.1:{chosen[s]}"
        wait_ready(url + HEALTH[s], timeout, proc, log_path(home, s))
        info[s] = {"port": chosen[s], "url": url, "pid": proc.pid, "running": True}
    _write_json(home / "stack.json", {s: v for s, v in info.items() if s in SERVICES})
    return info


def client_env(info: dict[str, Any]) -> dict[str, str]:
    """What a client exports to use the stack (credentials are moto's dummy ones)."""
    env = {}
    if "moto" in info:
        env |= {"S3_ENDPOINT_URL": info["moto"]["url"], "MLFLOW_S3_ENDPOINT_URL": info["moto"]["url"],
                "AWS_ENDPOINT_URL_S3": info["moto"]["url"]}
    if "mlflow" in info:
        env["MLFLOW_TRACKING_URI"] = info["mlflow"]["url"]
    if "prefect" in info:
        env["PREFECT_API_URL"] = info["prefect"]["url"] + "/api"
    return env


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def status(home: Path) -> dict[str, Any]:
    """{service: {port, url, pid, running}} from the state folder."""
    saved = _read_json(home / "stack.json")
    out = {}
    for s in SERVICES:
        pid_file = home / f"{s}.pid"
        if s in saved and pid_file.is_file():
            pid = int(pid_file.read_text())
            out[s] = {**saved[s], "pid": pid, "running": _alive(pid)}
    return out


def stop_group(pid: int, grace: float = 10.0) -> None:
    """SIGTERM the process group led by `pid`; SIGKILL it after `grace` seconds."""
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return
    os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        _reap(pid)
        time.sleep(0.1)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    _reap(pid)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)  # our own child: collect it so it does not linger as a zombie
    except ChildProcessError:
        pass


def down(home: Path) -> list[str]:
    """Stop every running service (Prefect, then MLflow, then moto); returns what was done."""
    lines = []
    for s in reversed(SERVICES):
        pid_file = home / f"{s}.pid"
        if not pid_file.is_file():
            continue
        pid = int(pid_file.read_text())
        stop_group(pid)
        pid_file.unlink()
        lines.append(f"{s}: stopped (pid {pid})")
    (home / "stack.json").unlink(missing_ok=True)
    return lines


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


if __name__ == "__main__":
    action, where = sys.argv[1], Path(sys.argv[2] if len(sys.argv) > 2 else ".stack")
    result = up(where) if action == "up" else down(where) if action == "down" else status(where)
    print(json.dumps(result, indent=2))
