"""deploy/ray/serve.yaml and deploy/kuberay/rayservice.yaml, parse-checked (Ray's own schema
for the Serve config; the manifest's structure): neither is applied to a cluster here."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from piggyback_serve.server import ray_app
from piggyback_serve.server.settings import Settings

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]
SERVE = ROOT / "deploy" / "ray" / "serve.yaml"
KUBERAY = ROOT / "deploy" / "kuberay" / "rayservice.yaml"


def serve_config() -> dict:
    return yaml.safe_load(SERVE.read_text())


def test_the_serve_config_passes_rays_schema_and_builds_our_app():
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(serve_config())
    (application,) = schema.applications
    assert application.import_path == "piggyback_serve.server.ray_app:app"
    assert application.route_prefix == "/"
    module, name = application.import_path.split(":")
    assert getattr(__import__(module, fromlist=[name]), name) is ray_app.app
    assert isinstance(ray_app.app(application.args), Application)
    (deployment,) = application.deployments
    assert deployment.name == ray_app.DEPLOYMENT
    scaling = deployment.autoscaling_config
    assert {"min_replicas", "max_replicas", "target_ongoing_requests"} <= set(scaling)
    assert scaling["max_replicas"] > 1  # so the registry must be one all replicas share
    assert deployment.ray_actor_options.num_gpus == 1


def test_its_settings_are_ours_and_valid():
    env = serve_config()["applications"][0]["runtime_env"]["env_vars"]
    fields = {k.removeprefix("PIGGY_").lower(): v for k, v in env.items()}
    assert all(k.startswith("PIGGY_") for k in env) and set(fields) <= set(Settings.model_fields)
    settings = Settings(**fields)
    assert settings.registry_url.startswith("redis://")
    args = serve_config()["applications"][0]["args"]
    ray_app.check_registry(settings.registry_url, 4, args["shared_registry"])


def test_the_rayservice_embeds_the_same_config_with_a_gpu_worker_group():
    manifest = yaml.safe_load(KUBERAY.read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    spec = manifest["spec"]
    assert yaml.safe_load(spec["serveConfigV2"]) == serve_config()
    cluster = spec["rayClusterConfig"]
    (gpu,) = [g for g in cluster["workerGroupSpecs"] if g["groupName"] == "gpu"]
    (container,) = gpu["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    name, value = ray_app.PROXY_CALLBACK
    for c in [*head, container]:
        assert {"name": name, "value": value} in c["env"], c["name"]
        assert 8000 in [p["containerPort"] for p in c["ports"]]
