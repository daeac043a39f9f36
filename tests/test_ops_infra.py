"""infra/ and prefect.yaml, validated without Docker or a cluster: the Compose specification
schema, the Kubernetes OpenAPI schemas, yamllint, and Prefect's own deployment model."""

from __future__ import annotations

import copy
import importlib
import json
import re
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
YAML_FILES = [
    ROOT / "prefect.yaml",
    INFRA / "compose.yaml",
    INFRA / "k8s" / "values.yaml",
    INFRA / "k8s" / "gpu-job.yaml",
]
K8S_VERSION = "1.37.0"


def load(path: Path):
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.name)
def test_yamllint(path):
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    conf = YamlLintConfig(
        "extends: default\nrules: {line-length: {max: 120}, document-start: disable, "
        "truthy: {check-keys: false}, comments: {min-spaces-from-content: 1}}"
    )
    problems = [p for p in linter.run(path.read_text(), conf) if p.level == "error"]
    assert not problems, "\n".join(f"{path.name}:{p.line}:{p.column} {p.message}" for p in problems)


def test_compose_matches_the_compose_spec():
    import jsonschema
    from check_jsonschema.builtin_schemas import get_builtin_schema

    schema = get_builtin_schema("vendor.compose-spec")
    doc = load(INFRA / "compose.yaml")
    jsonschema.validate(doc, schema)
    services = doc["services"]
    assert {"postgres", "minio", "prefect-server", "mlflow", "worker-gpu"} <= set(services)
    # every published port binds loopback only
    for name, svc in services.items():
        for p in svc.get("ports", []):
            assert str(p).startswith("127.0.0.1:"), f"{name}: port {p} is not bound to 127.0.0.1"
    # the worker reserves an NVIDIA GPU; MLflow stores metadata in Postgres and artifacts in S3
    devices = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    cmd = " ".join(services["mlflow"]["command"])
    assert "postgresql://" in cmd and "--artifacts-destination s3://" in cmd
    assert services["mlflow"]["environment"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert (
        "postgresql+asyncpg://"
        in services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    )


def test_no_secrets_in_infra_files():
    text = (INFRA / "compose.yaml").read_text()
    # passwords only as required variables, never literal values
    for m in re.finditer(r"(PASSWORD|SECRET_ACCESS_KEY):\s+(\S+)", text):
        assert m.group(2).startswith("${"), f"literal secret in compose.yaml: {m.group(0)}"
    assert ":eagle3@" not in text and "minioadmin" not in text
    env_example = (INFRA / ".env.example").read_text()
    assert "change-me" in env_example


def _fill(template, values: dict):
    """Render a Prefect base job template the way the worker does: whole-string placeholders
    take the variable's value (any type), embedded ones are substituted as text."""
    if isinstance(template, dict):
        return {k: _fill(v, values) for k, v in template.items()}
    if isinstance(template, list):
        return [_fill(v, values) for v in template]
    if isinstance(template, str):
        whole = re.fullmatch(r"\{\{\s*(\w+)\s*\}\}", template)
        if whole:
            return values[whole.group(1)]
        return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: str(values[m.group(1)]), template)
    return template


def test_kubernetes_job_template_renders_a_valid_gpu_job():
    import kubernetes_validate

    tpl = json.loads((INFRA / "k8s" / "base-job-template.json").read_text())
    props = tpl["variables"]["properties"]
    values = {k: copy.deepcopy(v.get("default")) for k, v in props.items()}
    # what the Kubernetes worker passes in: env as a list, the command as args
    values["env"] = [{"name": k, "value": v} for k, v in values["env"].items()]
    values["command"] = ["prefect", "flow-run", "execute"]
    values["name"] = "eagle3-run"
    manifest = _fill(tpl["job_configuration"]["job_manifest"], values)
    kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)
    pod = manifest["spec"]["template"]["spec"]
    res = pod["containers"][0]["resources"]
    assert res["limits"]["nvidia.com/gpu"] == 1 == res["requests"]["nvidia.com/gpu"]
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    # every placeholder in the template is a declared variable
    used = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", json.dumps(tpl["job_configuration"])))
    assert used <= set(props), used - set(props)


def test_plain_gpu_job_and_helm_values():
    import kubernetes_validate

    job = load(INFRA / "k8s" / "gpu-job.yaml")
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["command"][:2] == ["eagle3", "pipeline"]
    assert (ROOT / c["command"][3]).is_file()
    values = load(INFRA / "k8s" / "values.yaml")
    assert values["worker"]["config"]["workPool"] == "eagle3-gpu"
    assert values["worker"]["config"]["type"] == "kubernetes"


def test_prefect_yaml_deployments():
    from prefect.cli.deploy._models import PrefectYamlModel
    from prefect.client.schemas.schedules import CronSchedule

    raw = load(ROOT / "prefect.yaml")
    model = PrefectYamlModel.model_validate(raw)
    deps = {d.name: d for d in model.deployments}
    assert {"scheduled", "on-demand", "scheduled-gpu", "on-demand-gpu"} <= set(deps)
    expect_flow = {
        "scheduled": "eagle3-pipeline",
        "on-demand": "eagle3-infer",
        "monitor": "eagle3-monitor",
        "traffic-retention": "eagle3-traffic-retention",
        "adapt": "eagle3-adapt",
    }
    pools = {"eagle3-local", "eagle3-gpu"}
    readme = (INFRA / "README.md").read_text()
    for name, d in deps.items():
        path, func = d.entrypoint.split(":")
        assert (ROOT / path).is_file()
        fl = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), func)
        assert fl.name == expect_flow[name.removesuffix("-gpu")]
        # the parameters are the flow's own, and the recipe exists
        assert set(d.parameters) <= set(fl.parameters.properties), name
        assert (ROOT / d.parameters["config"]).is_file()
        assert d.work_pool.name in pools and d.work_pool.name in readme
        for s in d.schedules or []:
            CronSchedule(cron=s.cron, timezone=s.timezone)
    assert deps["scheduled"].schedules and deps["scheduled"].schedules[0].cron == "0 3 * * 1"
    assert not deps["on-demand"].schedules
    assert not deps["adapt"].schedules  # started on demand (or by an automation), never by cron
    assert deps["scheduled-gpu"].work_pool.job_variables["gpus"] == 1
    assert deps["monitor"].schedules[0].cron == "5 * * * *" and deps["traffic-retention"].schedules


def test_the_traffic_event_triggers_adaptation_of_its_own_model():
    """The adapt deployment's trigger validates as Prefect builds it at deploy time, matches the
    event the monitor emits for the registered model of the deployment's own recipe, and renders
    the event's window as the flow's since/until."""
    import inspect

    import jinja2
    from prefect.cli.deploy._triggers import _initialize_deployment_triggers

    from eagle3.config import load_recipe
    from eagle3.ops.tracking import registered_model_name
    from flows.adapt import adapt_flow
    from flows.monitor import ENOUGH, resource_id

    deps = {d["name"]: d for d in load(ROOT / "prefect.yaml")["deployments"]}
    dep = deps["adapt"]
    (trig,) = _initialize_deployment_triggers(dep["name"], dep["triggers"])
    model = registered_model_name(load_recipe(ROOT / dep["parameters"]["config"]))
    assert trig.expect == {ENOUGH} and trig.enabled
    assert trig.match.root["prefect.resource.id"] == resource_id(model)
    assert not dep.get("schedules")  # the event starts it, not the clock
    assert all(not d.get("triggers") for n, d in deps.items() if n != "adapt")
    params = inspect.signature(adapt_flow.fn).parameters
    assert set(trig.parameters) <= set(params)

    def render(payload: dict) -> dict:
        return {k: jinja2.Template(str(v)).render(event={"payload": payload})
                for k, v in trig.parameters.items()}  # fmt: skip

    window = {"since": "2026-12-01T00:00:00Z", "until": "2026-12-02T00:00:00Z"}
    got = render(window)
    assert (got["since"], got["until"]) == (window["since"], window["until"])
    assert render({**window, "since": None})["since"] == ""  # adapt_flow reads "" as no start


def test_workers_get_a_least_privilege_bucket_user():
    """The worker and MLflow never hold MinIO's root credentials; their users may touch only
    their part of the bucket (the worker writes only under eagle3/, MLflow only artifacts)."""
    services = load(INFRA / "compose.yaml")["services"]
    for name in ("worker-gpu", "mlflow"):
        env = services[name]["environment"]
        assert "MINIO_ROOT" not in json.dumps(env), name
        assert env["AWS_ACCESS_KEY_ID"] != services["minio"]["environment"]["MINIO_ROOT_USER"]
    assert "EAGLE3_WORKER_S3_KEY" in services["worker-gpu"]["environment"]["AWS_ACCESS_KEY_ID"]
    assert "EAGLE3_MLFLOW_S3_KEY" in services["mlflow"]["environment"]["AWS_ACCESS_KEY_ID"]
    init = " ".join(services["minio-init"]["command"])
    assert "for who in worker mlflow" in init and '"/policies/$$who-policy.json"' in init
    assert "./minio:/policies:ro" in services["minio-init"]["volumes"]
    for who in ("worker", "mlflow"):
        key = f"EAGLE3_{who.upper()}_S3_KEY"
        assert f'mc admin policy attach local eagle3-{who} --user "$${key}"' in init

    def grants(who: str) -> dict[str, set[str]]:
        policy = json.loads((INFRA / "minio" / f"{who}-policy.json").read_text())
        out: dict[str, set[str]] = {}
        for st in policy["Statement"]:
            assert st["Effect"] == "Allow"
            for a in st["Action"]:
                assert "*" not in a and not a.startswith("admin:"), (who, a)
                out.setdefault(a, set()).update(st["Resource"])
        return out

    bucket = "arn:aws:s3:::EAGLE3_BUCKET"
    w = grants("worker")
    assert w["s3:PutObject"] == w["s3:DeleteObject"] == {f"{bucket}/eagle3/*"}
    assert w["s3:GetObject"] == {f"{bucket}/*"} and w["s3:ListBucket"] == {bucket}
    m = grants("mlflow")
    assert m["s3:PutObject"] == m["s3:GetObject"] == {f"{bucket}/mlflow-artifacts/*"}
    assert not {"s3:CreateBucket", "s3:DeleteBucket", "s3:PutBucketPolicy"} & (set(w) | set(m))
