"""docker/: the compose file is valid for Docker Compose, and the image installs what the Makefile installs.

No Docker engine runs here. The compose file is checked by a real Compose implementation's ``config`` (which
validates it against the Compose schema, interpolates the variables and resolves the profiles, all without
an engine): the ``docker compose`` plugin where it works, else a ``docker-compose`` on PATH (Debian's package,
installed by ``make e2e-tools``). Where neither exists those tests skip and say so; the Dockerfile checks
always run.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE_FILE = DOCKER / "docker-compose.yml"
DOCKERFILE = DOCKER / "Dockerfile"
SECRETS = {"LABEL_STUDIO_PASSWORD": "test-password", "LABEL_STUDIO_API_KEY": "0123456789abcdef" * 2 + "0123"}


@cache
def compose_command() -> list[str] | None:
    """``$HIH_COMPOSE`` if set, else ``docker compose`` (the plugin) if it works, else ``docker-compose``."""
    candidates: list[list[str]] = []
    if os.environ.get("HIH_COMPOSE"):
        candidates.append(shlex.split(os.environ["HIH_COMPOSE"]))
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    for exe in (shutil.which("docker-compose"), "/usr/bin/docker-compose"):
        if exe and Path(exe).exists():
            candidates.append([exe])
    for cmd in candidates:
        try:
            r = subprocess.run([*cmd, "version"], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if r.returncode == 0:
            return cmd
    return None


def compose(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = compose_command()
    if cmd is None:
        pytest.skip("no Docker Compose here (neither the `docker compose` plugin nor `docker-compose`): "
                    "`make e2e-tools` installs Debian's docker-compose")
    # Only the variables given: nothing from this shell (or a docker/.env) leaks into the check.
    empty = Path(tempfile.gettempdir()) / "hih-compose-empty.env"
    empty.write_text("")
    base = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")}
    return subprocess.run(
        [*cmd, "--project-directory", str(DOCKER), "--env-file", str(empty), "-f", str(COMPOSE_FILE), *args],
        capture_output=True, text=True, timeout=120, env={**base, **(env if env is not None else SECRETS)},
    )


def resolved(*profiles: str, env: dict[str, str] | None = None) -> dict:
    yaml = pytest.importorskip("yaml")
    flags = [x for p in profiles for x in ("--profile", p)]
    r = compose(*flags, "config", env=env)
    assert r.returncode == 0, f"`{shlex.join(r.args)}` failed:\n{r.stderr}\n{r.stdout}"
    return yaml.safe_load(r.stdout)


# ------------------------------------------------------------------------------------------------ compose
def test_compose_file_is_valid_with_and_without_the_gpu_profile():
    for profiles in ((), ("gpu",)):
        flags = [x for p in profiles for x in ("--profile", p)]
        r = compose(*flags, "config", "--quiet")
        assert r.returncode == 0, f"{compose_command()} rejects {COMPOSE_FILE} {flags}:\n{r.stderr}"


def test_compose_refuses_to_start_without_the_admin_secrets():
    r = compose("config", "--quiet", env={})
    assert r.returncode != 0
    assert "LABEL_STUDIO_PASSWORD" in r.stderr or "LABEL_STUDIO_API_KEY" in r.stderr, r.stderr


def test_compose_services_reach_each_other():
    cfg = resolved()
    services = cfg["services"]
    assert {"label-studio", "redis", "backend", "worker"} <= set(services)
    # only with --profile gpu (Compose 2+ leaves it out of `config`; docker-compose 1.x lists it + profile)
    assert "worker-gpu" not in services or services["worker-gpu"]["profiles"] == ["gpu"]

    ls = services["label-studio"]
    assert re.fullmatch(r"heartexlabs/label-studio:1\.23\.\d+", ls["image"]), ls["image"]
    env = ls["environment"]
    # Label Studio 1.23 refuses an ML backend on a private address (and skips its webhook) unless both are off
    assert env["ML_BLOCK_LOCAL_IP"] == "false" and env["SSRF_PROTECTION_ENABLED"] == "false"
    assert env["LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN"] == "true"
    assert env["LABEL_STUDIO_PASSWORD"] == SECRETS["LABEL_STUDIO_PASSWORD"]
    assert env["LABEL_STUDIO_USER_TOKEN"] == SECRETS["LABEL_STUDIO_API_KEY"]
    assert env["LABEL_STUDIO_USERNAME"]

    redis = services["redis"]
    assert any(v["target"] == "/data" and v["type"] == "volume" for v in _volumes(redis)), redis
    assert "--appendonly" in redis["command"]

    for name in ("backend", "worker"):
        svc = services[name]
        e = svc["environment"]
        assert e["REDIS_URL"] == "redis://redis:6379/0"
        assert e["LABEL_STUDIO_URL"] == "http://label-studio:8080"
        assert e["LABEL_STUDIO_API_KEY"] == SECRETS["LABEL_STUDIO_API_KEY"]
        assert e["MODEL_DIR"] == "/data/models"
        assert any(v["target"] == "/data/models" and v["source"] == "model-store" for v in _volumes(svc))
        assert svc["build"]["dockerfile"].endswith("docker/Dockerfile")
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["backend"]["command"] == ["hih-assist", "serve", "--no-worker"]  # workers: their own
    assert services["worker"]["command"] == ["hih-assist", "worker"]
    assert services["backend"]["image"] == services["worker"]["image"]  # one image for both
    assert int(services["worker"]["deploy"]["replicas"]) == 1

    for name, svc in services.items():
        assert svc.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    assert "/health" in " ".join(services["backend"]["healthcheck"]["test"])
    assert {"label-studio-data", "redis-data", "model-store"} <= set(cfg["volumes"])


def test_compose_scales_workers_and_reserves_the_gpu_for_the_gpu_worker():
    cfg = resolved("gpu", env={**SECRETS, "HIH_WORKERS": "3"})
    services = cfg["services"]
    assert int(services["worker"]["deploy"]["replicas"]) == 3
    gpu = services["worker-gpu"]
    assert gpu["command"] == ["hih-assist", "worker"]
    assert gpu["environment"]["HIH_DEVICE"] == "cuda"
    assert gpu["environment"]["REDIS_URL"] == services["worker"]["environment"]["REDIS_URL"]
    assert gpu["build"]["args"]["TORCH_VARIANT"].startswith("cu")
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices), devices
    assert "deploy" not in services["backend"] or "resources" not in services["backend"]["deploy"]


def _volumes(service: dict) -> list[dict]:
    out = []
    for v in service.get("volumes", []):
        if isinstance(v, str):  # docker-compose 1.x prints the short form: source:target[:mode]
            parts = v.split(":")
            kind = "bind" if "/" in parts[0] else "volume"
            out.append({"source": parts[0], "target": parts[1], "type": kind})
        else:
            out.append(v)
    return out


# ------------------------------------------------------------------------------------------------ image
def _makefile_install() -> tuple[str, set[str]]:
    text = (ROOT / "Makefile").read_text()
    torch = re.search(r"pip install[^\n]*\btorch==([\w.+-]+)", text)
    extras = re.search(r"pip install[^\n]*-e '\.\[([\w,]+)\]'", text)
    assert torch and extras, "Makefile: expected `pip install ... torch==X` and `pip install -e '.[extras]'`"
    return torch.group(1), set(extras.group(1).split(","))


def _dockerfile_runs() -> list[str]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    return [line.strip()[4:] for line in text.splitlines() if line.strip().startswith("RUN ")]


def test_image_installs_what_the_makefile_installs():
    torch, extras = _makefile_install()
    runs = _dockerfile_runs()
    torch_runs = [r for r in runs if "torch==" in r]
    assert torch_runs, "the Dockerfile does not install torch first"
    assert f"torch=={torch}" in torch_runs[0], f"Makefile pins torch=={torch}; Dockerfile: {torch_runs[0]}"
    assert "--index-url" in torch_runs[0]
    project = [r for r in runs if re.search(r"pip install\s+'?\.\[", r)]
    assert project, "the Dockerfile does not `pip install .[...]` the project"
    assert runs.index(torch_runs[0]) < runs.index(project[0]), "torch must be installed before the project"
    image_extras = set(re.search(r"\.\[([\w,]+)\]", project[0]).group(1).split(","))
    assert image_extras == extras - {"dev"}, f"image {image_extras}, Makefile {extras}"
    pyproject = (ROOT / "pyproject.toml").read_text()
    for extra in image_extras:
        assert re.search(rf"^{extra}\s*=", pyproject, re.M), f"pyproject.toml has no extra {extra!r}"


def test_image_defaults_cpu_builds_cuda_runs_unprivileged_and_serves():
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG TORCH_VARIANT=cpu$", text, re.M)
    assert "https://download.pytorch.org/whl/${TORCH_VARIANT}" in text
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0"), "the image must run as a non-root user"
    health = re.search(r"^HEALTHCHECK .*?(?=^\S)", text, re.M | re.S)
    assert health and "/health" in health.group(0)
    assert re.search(r'^CMD \["hih-assist", "serve"\]$', text, re.M)


def test_build_context_has_what_the_dockerfile_copies():
    ignored = [
        line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for heavy in (".venv", ".e2e", "runs", ".git"):
        assert heavy in ignored, f".dockerignore should leave out {heavy}"
    sources = []
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            words = [w for w in line.split()[1:] if not w.startswith("--")]
            sources += words[:-1]
    assert sources
    for src in sources:
        assert src not in ignored, f"{src} is copied into the image but .dockerignore leaves it out"
        assert (ROOT / src).exists(), f"the Dockerfile copies {src}, which does not exist"


def test_compose_label_studio_matches_the_tested_one():
    installer = (ROOT / "scripts" / "install_label_studio.sh").read_text()
    spec = re.search(r"LABEL_STUDIO_SPEC:-label-studio==([\d.]+)", installer)
    image = re.search(r"label-studio:\$\{LABEL_STUDIO_VERSION:-([\d.]+)\}", COMPOSE_FILE.read_text())
    assert spec and image
    minor = spec.group(1).rstrip(".*")
    assert image.group(1).startswith(minor), f"compose runs {image.group(1)}, the tests use {spec.group(1)}"


def test_image_serves_the_shipped_model():
    from hih_settings import PACKAGED_WEIGHTS

    shipped = PACKAGED_WEIGHTS.relative_to(ROOT).as_posix()  # weights/hih_cpu_300w
    text = DOCKERFILE.read_text()
    assert re.search(r"^COPY .*\bweights /app/weights$", text, re.M)
    assert f"HIH_WEIGHTS=/app/{shipped}" in text, f"the image should serve {shipped} (HIH_WEIGHTS)"
