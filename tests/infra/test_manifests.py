"""What can be checked of infra/ without a Kubernetes cluster: the manifests parse, agree with
each other, the image and Ray version agree with the pinned dependencies and the Makefile, the
RayService's Serve config builds the application, and the cluster preset names only absolute
locations (a ``ray job submit`` job runs in an uploaded copy of the working directory)."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from components.config_loader import load_config
from pipelines.config import PipelineConfig

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"


def _load(name: str) -> dict:
    return yaml.safe_load((INFRA / name).read_text())


def _cluster_specs() -> dict[str, dict]:
    return {
        "raycluster.yaml": _load("raycluster.yaml")["spec"],
        "rayjob.yaml": _load("rayjob.yaml")["spec"]["rayClusterSpec"],
        "rayservice.yaml": _load("rayservice.yaml")["spec"]["rayClusterConfig"],
    }


def _containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_manifests_parse_and_share_one_cluster_spec():
    kinds = {name: _load(name)["kind"] for name in ("raycluster.yaml", "rayjob.yaml", "rayservice.yaml", "volume.yaml")}
    assert kinds == {
        "raycluster.yaml": "RayCluster",
        "rayjob.yaml": "RayJob",
        "rayservice.yaml": "RayService",
        "volume.yaml": "PersistentVolumeClaim",
    }
    specs = _cluster_specs()
    assert specs["rayjob.yaml"] == specs["raycluster.yaml"] == specs["rayservice.yaml"]


def test_image_and_ray_version_agree_with_the_pinned_dependencies():
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    ray_pin = re.search(r"^ray\[[^\]]*\]==([\d.]+)$", (ROOT / "requirements.txt").read_text(), re.M).group(1)
    spec = _cluster_specs()["raycluster.yaml"]
    assert spec["rayVersion"] == ray_pin
    claim = _load("volume.yaml")["metadata"]["name"]
    for container in _containers(spec):
        assert container["image"] == f"ultrarank:{version}"
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] == "serving.proxy_limits:middlewares"
        assert {m["mountPath"] for m in container["volumeMounts"]} == {"/mnt/ultrarank"}
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        assert group["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == claim
    dockerfile = (INFRA / "Dockerfile").read_text()
    assert f"-t ultrarank:{version}" in dockerfile
    assert "ENV RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serving.proxy_limits:middlewares" in dockerfile


def test_the_image_installs_what_make_install_installs():
    makefile = (ROOT / "Makefile").read_text()
    install = makefile[makefile.index("$(STAMP):") : makefile.index("touch $(STAMP)")]
    dockerfile = (INFRA / "Dockerfile").read_text()
    for needed in ("requirements.txt", "requirements-nodeps.txt", "constraints.txt"):
        assert needed in install and needed in dockerfile
    assert "--no-deps -r requirements-nodeps.txt" in install and "--no-deps -r requirements-nodeps.txt" in dockerfile
    assert "--no-deps --no-build-isolation -e ." in install and "--no-deps --no-build-isolation -e ." in dockerfile


def test_the_rayjob_runs_the_demo_command_with_the_cluster_preset():
    makefile = (ROOT / "Makefile").read_text()
    demo = re.search(r"^demo:.*\n\t\$\(PY\) (.+)$", makefile, re.M).group(1)
    entry = _load("rayjob.yaml")["spec"]["entrypoint"]
    assert entry == "python " + demo.replace("$(PRESET)", "cluster")


@pytest.mark.parametrize("preset", ["cluster", "gpu"])
def test_the_cluster_presets_name_only_absolute_locations(preset):
    config = load_config(PipelineConfig, preset)
    assert config.ray.address is None  # RAY_ADDRESS (set by `ray job submit`) decides
    for where in (
        config.lake.root,
        config.ingest.movielens_dir,
        config.ingest.download_dir,
        config.train.storage_path,
        config.export.output,
        config.serve.bundle,
        config.run.reports_dir,
        config.run.wandb_dir,
    ):
        assert "://" in where or os.path.isabs(where), where
    assert config.serve.bundle == config.export.output  # what the job exports is what is served


def test_the_gpu_preset_trains_with_nccl_row_wise_and_bf16():
    config = load_config(PipelineConfig, "gpu")
    assert config.train.use_gpu and config.train.bf16  # use_gpu: the nccl backend (pipelines/train.py)
    assert config.train.sharding_types[0] == "row_wise"
    from pipelines.config import CPU_SHARDING_TYPES

    assert "row_wise" not in CPU_SHARDING_TYPES  # it cannot be asked for without a GPU


def test_the_rayservice_serve_config_builds_the_application():
    from ray.serve.deployment import Application

    from serving.app import build, resolve

    serve_config = yaml.safe_load(_load("rayservice.yaml")["spec"]["serveConfigV2"])
    (app,) = serve_config["applications"]
    assert app["import_path"] == "serving.app:build"
    args = {k: str(v) for k, v in app["args"].items()}
    config, bundle, root, _ = resolve(args)
    assert (bundle, root) == ("/mnt/ultrarank/bundles/full", "/mnt/ultrarank/lake")
    assert config.num_replicas == 2 and config.routing == "affinity"
    assert isinstance(build(args), Application)
    assert serve_config["http_options"]["port"] == config.port


@pytest.mark.parametrize("name", ["runtime-env.yaml"])
def test_the_runtime_env_uploads_code_not_data(name):
    env = _load(name)
    for heavy in (".venv", "lake", "checkpoints", "bundles", "wandb"):
        assert heavy in env["excludes"]
    assert env["env_vars"]["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] == "serving.proxy_limits:middlewares"
