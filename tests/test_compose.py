"""The deployment files agree with the code: docker-compose.yml, deploy/prometheus.yml, Dockerfile.

Nothing here starts a container; the files are parsed and each cross-reference (environment
variable -> Settings field, endpoint -> service and port, bucket -> the one created, scrape
target -> listening port, healthcheck -> route) is checked against the code it names.
"""

from __future__ import annotations

import re
import shlex
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from pydantic import BaseModel

from config.settings import ENV_PREFIX, Settings, load_settings
from server.app import create_app
from storage.objectstore import MemoryStore
from storage.url import parse_store_url

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
PROMETHEUS = ROOT / "deploy" / "prometheus.yml"
DOCKERFILE = ROOT / "Dockerfile"
# MinIO's S3 API listens here unless its command says `--address`.
MINIO_DEFAULT_API_PORT = 9000
_SUBST = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?[?-][^}]*)?\}")


def compose() -> dict[str, Any]:
    with COMPOSE.open() as fh:
        doc: dict[str, Any] = yaml.safe_load(fh)
    return doc


def service(name: str) -> dict[str, Any]:
    services = compose()["services"]
    assert name in services, f"docker-compose.yml has no service {name!r}"
    svc: dict[str, Any] = services[name]
    return svc


def environment(svc: Mapping[str, Any]) -> dict[str, str]:
    """A service's environment (mapping or KEY=VALUE list form) as strings."""
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def substitute(value: str, fill: Mapping[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:?msg}, ${VAR:-default} with the given values (tests only)."""
    return _SUBST.sub(lambda m: fill[m.group(1)], value)


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    text = DOCKERFILE.read_text()
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            instr, _, rest = line.strip().partition(" ")
            out.append((instr.upper(), rest.strip()))
    return out


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instr, rest in dockerfile():
        if instr == "ENV":
            for token in shlex.split(rest):
                key, sep, value = token.partition("=")
                assert sep, f"use ENV KEY=VALUE in the Dockerfile, got {token!r}"
                env[key] = value
    return env


def settings_path(var: str) -> list[str]:
    """SPECTRALMC_A__B__C -> ['a', 'b', 'c'], checked against Settings' nested models."""
    assert var.startswith(ENV_PREFIX), var
    parts = var[len(ENV_PREFIX) :].lower().split("__")
    model: type[BaseModel] | None = Settings
    for i, part in enumerate(parts):
        assert model is not None, f"{var}: {'.'.join(parts[:i])} is not a settings group"
        fields = model.model_fields
        assert part in fields, f"{var}: {model.__name__} has no field {part!r}"
        annotation = fields[part].annotation
        model = _model_of(annotation)
    assert model is None, f"{var} names the whole group {'.'.join(parts)}, not a field"
    return parts


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds (through Optional), or None for a plain value."""
    candidates = typing.get_args(annotation) or (annotation,)
    for c in candidates:
        if isinstance(c, type) and issubclass(c, BaseModel):
            return c
    return None


# --- environment -> settings --------------------------------------------------------------------


def test_every_spectralmc_variable_names_a_settings_field() -> None:
    env = environment(service("spectralmc"))
    ours = [k for k in env if k.upper().startswith(ENV_PREFIX)]
    assert ours, "the spectralmc service sets no SPECTRALMC_* variable"
    for var in ours:
        assert var == var.upper(), f"{var}: write settings variables in upper case"
        settings_path(var)
    for var in dockerfile_env():
        if var.startswith(ENV_PREFIX):
            settings_path(var)


def test_the_walk_follows_nested_models_and_refuses_non_fields() -> None:
    assert settings_path("SPECTRALMC_CORE__SIM__SEED") == ["core", "sim", "seed"]
    assert settings_path("SPECTRALMC_TRAINING__COMMIT__EVERY_STEPS") == [
        "training",
        "commit",
        "every_steps",
    ]
    for bad in (
        "SPECTRALMC_SERVER__PROT",  # a typo
        "SPECTRALMC_STORE",  # a group, not a field
        "SPECTRALMC_TRAINING__COMMIT",
        "SPECTRALMC_SERVER__PORT__X",  # below a plain field
        "SPECTRALMC_SERVER_PORT",  # a single underscore is not the delimiter
    ):
        with pytest.raises(AssertionError):
            settings_path(bad)


def _image_and_service_env() -> dict[str, str]:
    """What the container sees: the image's ENV, overridden by the compose environment, with
    placeholder values for the variables compose takes from .env."""
    fill = {
        "MINIO_ROOT_USER": "minio-user",
        "MINIO_ROOT_PASSWORD": "minio-password-123",
        "SPECTRALMC_ADMIN_TOKEN": "a-long-enough-admin-token",
    }
    env = dockerfile_env()
    for key, value in environment(service("spectralmc")).items():
        env[key] = substitute(value, fill)
    return {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}


def test_the_container_environment_loads_as_settings() -> None:
    settings = load_settings(env=_image_and_service_env())
    assert settings.server.host == "0.0.0.0"  # reachable from the other containers
    assert parse_store_url(settings.store.url).scheme == "s3"
    assert settings.store.s3_access_key_id is not None
    assert settings.store.s3_access_key_id.get_secret_value() == "minio-user"
    assert settings.admin.token is not None


def test_the_image_defaults_load_as_settings() -> None:
    settings = load_settings(env=dockerfile_env())
    url = parse_store_url(settings.store.url)
    assert url.scheme == "file" and url.path.startswith("/home/spectralmc/")


def test_credentials_come_from_the_environment_only() -> None:
    env = environment(service("spectralmc"))
    for key in ("SPECTRALMC_STORE__S3_ACCESS_KEY_ID", "SPECTRALMC_STORE__S3_SECRET_ACCESS_KEY"):
        assert _SUBST.fullmatch(env[key]), f"{key} must come from .env, got a literal"
    assert _SUBST.fullmatch(env["SPECTRALMC_ADMIN__TOKEN"])
    minio = environment(service("minio"))
    for key in ("MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"):
        assert _SUBST.fullmatch(minio[key]), f"minio {key} must come from .env"


# --- S3: endpoint and bucket --------------------------------------------------------------------


def minio_api_port() -> int:
    command = service("minio").get("command", "")
    args = shlex.split(command) if isinstance(command, str) else list(command)
    if "--address" in args:
        return int(args[args.index("--address") + 1].rsplit(":", 1)[1])
    return MINIO_DEFAULT_API_PORT


def test_s3_endpoint_is_the_minio_service() -> None:
    settings = load_settings(env=_image_and_service_env())
    endpoint = settings.store.s3_endpoint_url
    assert endpoint is not None
    parts = urlsplit(endpoint)
    assert parts.hostname == "minio" and "minio" in compose()["services"]
    assert (parts.port or 80) == minio_api_port()
    deps = service("spectralmc")["depends_on"]
    assert deps["minio-init"]["condition"] == "service_completed_successfully"


def minio_init_script() -> str:
    entry = service("minio-init")["entrypoint"]
    return entry if isinstance(entry, str) else " ".join(entry)


def test_the_store_bucket_is_the_one_minio_init_creates() -> None:
    script = minio_init_script()
    alias = re.search(r"mc alias set (\S+) (\S+)", script)
    assert alias is not None, script
    name, url = alias.groups()
    target = urlsplit(url)
    assert target.hostname == "minio" and target.port == minio_api_port()
    created = re.findall(rf"mc mb (?:--\S+ )*{re.escape(name)}/([a-z0-9.-]+)", script)
    assert created, f"minio-init creates no bucket: {script}"
    store = parse_store_url(load_settings(env=_image_and_service_env()).store.url)
    assert store.bucket in created
    assert store.prefix, "keep the chain under a prefix, not the bucket root"


# --- ports, scraping, health --------------------------------------------------------------------


def listening_port() -> int:
    return load_settings(env=_image_and_service_env()).server.port


def test_published_port_is_the_listening_port() -> None:
    port = listening_port()
    published = [str(p) for p in service("spectralmc").get("ports", [])]
    assert any(p.rsplit(":", 1)[-1] == str(port) for p in published), published
    exposed = [rest for instr, rest in dockerfile() if instr == "EXPOSE"]
    assert str(port) in " ".join(exposed).split()


def test_prometheus_scrapes_the_service_metrics_route() -> None:
    prom = service("prometheus")
    mounts = [str(v) for v in prom.get("volumes", [])]
    assert any(
        m.split(":")[0] == "./deploy/prometheus.yml"
        and m.split(":")[1] == "/etc/prometheus/prometheus.yml"
        for m in mounts
    ), mounts
    with PROMETHEUS.open() as fh:
        config = yaml.safe_load(fh)
    jobs = [j for j in config["scrape_configs"] if j["job_name"] == "spectralmc"]
    assert len(jobs) == 1
    job = jobs[0]
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"spectralmc:{listening_port()}"]
    assert job.get("metrics_path", "/metrics") in routes()


def routes() -> set[str]:
    app = create_app(Settings.model_validate({"training": {"enabled": False}}), store=MemoryStore())
    return {r.resource.canonical for r in app.router.routes() if r.resource is not None}


def test_image_healthcheck_hits_healthz_on_the_listening_port() -> None:
    checks = [rest for instr, rest in dockerfile() if instr == "HEALTHCHECK"]
    assert len(checks) == 1
    urls = re.findall(r"https?://[^'\"\s]+", checks[0])
    assert len(urls) == 1, checks[0]
    url = urlsplit(urls[0])
    assert url.path == "/healthz" and "/healthz" in routes()
    assert url.port == listening_port() == int(dockerfile_env()["SPECTRALMC_SERVER__PORT"])
    assert url.hostname in ("127.0.0.1", "localhost")


# --- image ----------------------------------------------------------------------------------------


def test_image_runs_as_a_created_non_root_user() -> None:
    instrs = dockerfile()
    users = [rest for instr, rest in instrs if instr == "USER"]
    assert users, "the image never leaves root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    created = " ".join(rest for instr, rest in instrs if instr == "RUN")
    assert re.search(rf"useradd\b[^&]*\b{re.escape(user)}\b", created), "USER is never created"
    uid = re.search(r"--uid (\d+)", created)
    assert uid is None or int(uid.group(1)) != 0


def test_image_installs_the_gpu_extra_and_runs_the_cli() -> None:
    with (ROOT / "pyproject.toml").open("rb") as fh:
        project = tomllib.load(fh)["project"]
    assert "gpu" in project["optional-dependencies"]
    installs = [rest for instr, rest in dockerfile() if instr == "RUN" and "pip install" in rest]
    extras = {
        e.strip()
        for rest in installs
        for group in re.findall(r"\.\[([^\]]+)\]", rest)
        for e in group.split(",")
    }
    assert "gpu" in extras, installs
    entry = [rest for instr, rest in dockerfile() if instr == "ENTRYPOINT"]
    cmd = [rest for instr, rest in dockerfile() if instr == "CMD"]
    assert entry and yaml.safe_load(entry[-1])[0] in project["scripts"]
    assert cmd and yaml.safe_load(cmd[-1]) == ["serve"]
