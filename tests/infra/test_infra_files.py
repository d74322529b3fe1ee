"""The user-facing infra files parse and say what the README promises: the compose stack has its
services with loopback-only ports and no inline secrets; the DeepSpeed examples are valid configs;
the hostfile example is in DeepSpeed's format."""

import json
import re
from pathlib import Path

import yaml

INFRA = Path(__file__).resolve().parents[2] / "infra"


def _compose() -> dict:
    return yaml.safe_load((INFRA / "docker-compose.yml").read_text(encoding="utf-8"))


def test_compose_declares_the_stack():
    services = _compose()["services"]
    assert {"postgres", "minio", "mlflow", "prefect"} <= set(services)
    assert any("worker" in name for name in services), "no Prefect worker service"
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, f"{name}: neither image nor build"
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"


def test_compose_publishes_ports_on_loopback_only():
    for name, svc in _compose()["services"].items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_compose_has_no_inline_secrets():
    text = (INFRA / "docker-compose.yml").read_text(encoding="utf-8")
    for line in text.splitlines():
        m = re.search(r"(PASSWORD|SECRET[A-Z_]*)\s*:\s*(\S+)", line)
        if m and not line.lstrip().startswith("#"):
            assert m.group(2).startswith("${") or m.group(2).startswith("$$"), line


def test_deepspeed_examples_are_valid_configs():
    from deepspeed.runtime.config import DeepSpeedConfig

    files = sorted((INFRA / "deepspeed").glob("*.json"))
    assert files
    for path in files:
        cfg = json.loads(path.read_text(encoding="utf-8"))
        stage = cfg.get("zero_optimization", {}).get("stage", 0)
        assert stage in (0, 1, 2), f"{path.name}: ZeRO stage {stage} is not supported by capfilt"
        parsed = DeepSpeedConfig(cfg)  # raises on unknown keys and inconsistent batch sizes
        assert parsed.zero_optimization_stage == stage


def test_hostfile_example_format():
    lines = [ln for ln in (INFRA / "hostfile.example").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines and all(re.fullmatch(r"\S+ slots=\d+", ln) for ln in lines)


def test_stack_status_says_when_nothing_runs_or_a_service_died(tmp_path, capsys):
    import subprocess
    import sys

    from components.cli import main

    home = tmp_path / ".stack"
    assert main(["stack", "status", "--home", str(home)]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == {} and "`capfilt stack up` starts them" in err
    home.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that has exited and been reaped
    (home / "stack.json").write_text(json.dumps({"mlflow": {"port": 5000, "url": "http://127.0.0.1:5000"}}))
    (home / "mlflow.pid").write_text(str(gone.pid))
    assert main(["stack", "status", "--home", str(home)]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["mlflow"]["running"] is False
    assert f"mlflow: pid {gone.pid} is not running" in err and "mlflow.log" in err
