"""infra/: what can be checked without a cluster, a registry or a Docker daemon.

Manifests and configs parse; the Ray cluster-launcher config passes Ray's own schema;
entry points exist and their flags parse with the real `storymem` parsers; images are the
ones infra/ builds; container builds copy files that exist.
"""
from __future__ import annotations

import fnmatch
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


VERSION = _pyproject()["project"]["version"]
IMAGES = {f"storymem:{VERSION}": "infra/Dockerfile", f"storymem-hps:{VERSION}": "infra/Dockerfile.hps"}


def _yaml(name: str) -> dict:
    return yaml.safe_load((INFRA / name).read_text())


# -- container builds --------------------------------------------------------------------
def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def copy_sources(instructions) -> list[str]:
    sources = []
    for word, rest in instructions:
        if word in ("COPY", "ADD"):
            parts = [p for p in shlex.split(rest) if not p.startswith("--")]
            sources += parts[:-1]
    return sources


def dockerignore_patterns(dockerfile: Path) -> list[str]:
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    return [line.strip() for line in ignore.read_text().splitlines()
            if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.hps"])
def test_container_builds_copy_files_that_exist_and_are_not_ignored(dockerfile):
    path = INFRA / dockerfile
    instructions = dockerfile_instructions(path)
    assert instructions[0][0] in ("ARG", "FROM") and any(w == "FROM" for w, _ in instructions)
    sources = copy_sources(instructions)
    assert sources, f"{dockerfile} copies nothing"
    patterns = dockerignore_patterns(path)
    for source in sources:
        assert (ROOT / source).exists(), f"{dockerfile}: COPY {source}: no such file in the project"
        for pattern in patterns:
            bare = pattern.removeprefix("**/")
            assert not fnmatch.fnmatch(source.rstrip("/"), pattern) and \
                not fnmatch.fnmatch(Path(source).name, bare), \
                f"{dockerfile}: {source} is excluded by its .dockerignore ({pattern})"


def test_main_image_has_the_whole_project_where_the_deployments_expect_it():
    instructions = dockerfile_instructions(INFRA / "Dockerfile")
    sources = {s.rstrip("/") for s in copy_sources(instructions)}
    packages = _pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    for package in packages:
        assert package.rstrip("*") in sources, f"the image lacks the {package} package"
    assert "pyproject.toml" in sources
    workdirs = [rest for word, rest in instructions if word == "WORKDIR"]
    pull = _yaml("prefect.yaml")["pull"][0]["prefect.deployments.steps.set_working_directory"]
    assert workdirs[-1] == pull["directory"] == "/opt/storymem"
    run = " ".join(rest for word, rest in instructions if word == "RUN")
    assert "pip install" in run and "-e ." in run and "storymem --help" in run
    assert "storymem" in _pyproject()["project"]["scripts"]


def test_hps_image_builds_the_environment_the_batch_looks_for():
    from pipelines.scorer_pools import DEFAULT_HPS_PYTHON, PROJECT_ROOT

    instructions = dockerfile_instructions(INFRA / "Dockerfile.hps")
    run = " ".join(rest for word, rest in instructions if word == "RUN")
    match = re.search(r"make -f (\S+) HPS_VENV=(\S+) MAIN_VENV=(\S+)", run)
    assert match, "Dockerfile.hps does not build the HPS env with infra/hps-env.mk"
    makefile, hps_venv, main_venv = match.groups()
    assert (ROOT / makefile).is_file() and makefile == "infra/hps-env.mk"
    assert main_venv == ".venv"  # the main image's venv (Dockerfile: python -m venv .venv)
    # The batch's default HPS interpreter, relative to the project root (/opt/storymem).
    assert DEFAULT_HPS_PYTHON.relative_to(PROJECT_ROOT) == Path(hps_venv) / "bin" / "python"
    base = [rest for word, rest in instructions if word == "ARG" and rest.startswith("BASE_IMAGE")]
    assert base and base[0].split("=", 1)[1] in IMAGES


def test_image_build_targets_produce_the_images_the_manifests_use():
    text = (INFRA / "images.mk").read_text()
    assert "-f infra/Dockerfile -t $(IMAGE):$(VERSION)" in text
    assert "-f infra/Dockerfile.hps" in text and "-t $(IMAGE)-hps:$(VERSION)" in text
    assert re.search(r"^IMAGE \?= storymem$", text, re.M)


# -- KubeRay -----------------------------------------------------------------------------
def _containers(spec: dict) -> dict[str, list[dict]]:
    groups = {"head": spec["headGroupSpec"]["template"]["spec"]["containers"]}
    for group in spec["workerGroupSpecs"]:
        groups[group["groupName"]] = group["template"]["spec"]["containers"]
    return groups


def test_raycluster_has_gpu_story_workers_and_scorers_with_project_images():
    import ray

    manifest = _yaml("kuberay/raycluster.yaml")
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayCluster"
    spec = manifest["spec"]
    assert spec["rayVersion"] == ray.__version__
    assert f"ray[data,serve]=={ray.__version__}" in _pyproject()["project"]["dependencies"]
    containers = _containers(spec)
    assert set(containers) == {"head", "story-workers", "scorers"}
    for group, items in containers.items():
        for container in items:
            assert container["image"] in IMAGES, f"{group}: unknown image {container['image']}"
            gpus = container["resources"]["limits"].get("nvidia.com/gpu")
            assert (gpus is not None) == (group != "head"), group
    head_ports = {p["containerPort"] for p in containers["head"][0]["ports"]}
    assert {6379, 8265, 10001} <= head_ports
    assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    # Any GPU node may host the HPSv3 scorer actor: the GPU groups carry its environment.
    for group in ("story-workers", "scorers"):
        assert containers[group][0]["image"].startswith("storymem-hps:")
    for group in spec["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_every_pod_that_reads_model_folders_mounts_them_read_only():
    """Workers load the weights; the head (the batch driver resolves the config hash from
    file headers) and the Prefect flow pod do too: one claim, mounted read-only."""
    spec = _yaml("kuberay/raycluster.yaml")["spec"]
    pods = {"head": spec["headGroupSpec"]["template"]["spec"]}
    pods.update({g["groupName"]: g["template"]["spec"] for g in spec["workerGroupSpecs"]})
    pods["prefect-flow"] = _prefect_flow_pod()
    for name, pod in pods.items():
        (volume,) = [v for v in pod["volumes"] if v["name"] == "models"]
        assert volume["persistentVolumeClaim"] == {"claimName": "storymem-models",
                                                   "readOnly": True}, name
        (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "models"]
        assert mount == {"name": "models", "mountPath": "/models", "readOnly": True}, name


def test_rayjob_runs_storymem_batch_on_the_same_cluster_spec():
    from flows.cli import build_parser
    from flows.cli.model_flags import specs_from_args

    job = _yaml("kuberay/rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["spec"]["rayClusterSpec"] == _yaml("kuberay/raycluster.yaml")["spec"]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "storymem" and argv[0] in _pyproject()["project"]["scripts"]
    args = build_parser().parse_args(argv[1:])  # the real `storymem` parser
    assert args.command == "batch" and args.ray_address == "auto"
    assert args.workers >= 1 and args.gpus_per_worker == 1
    model, scorers, settings = specs_from_args(args)  # the specs the driver resolves
    assert model.model_dir and model.lora_dir and scorers.clip_checkpoint and scorers.has_gate
    assert settings.memory and settings.transition == "mi2v"
    for path in (model.model_dir, model.t2v_model_dir, model.lora_dir,
                 scorers.clip_checkpoint, scorers.hps_checkpoint, scorers.hps_base_model):
        assert path.startswith("/models/"), path  # on the read-only models volume
    assert job["spec"]["shutdownAfterJobFinishes"] is True


# -- Ray cluster launcher ------------------------------------------------------------------
def test_cluster_launcher_config_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _yaml("ray-cluster.yaml")
    validate_config(prepare_config(config))  # Ray's own JSON schema and checks
    types = config["available_node_types"]
    assert config["head_node_type"] == "head" and types["head"]["resources"]["CPU"] == 0
    assert types["story_worker"]["resources"] == {"story_worker": 1}
    assert types["scorer"]["resources"] == {"scorer": 1}
    images = {config["docker"]["image"]} | {t["docker"]["worker_image"]
                                            for t in types.values() if "docker" in t}
    assert images <= set(IMAGES)
    head = " ".join(config["head_start_ray_commands"])
    assert "--head" in head and "--dashboard-host=0.0.0.0" in head


# -- Prefect deployments -------------------------------------------------------------------
def _deployments() -> dict[str, dict]:
    return {d["name"]: d for d in _yaml("prefect.yaml")["deployments"]}


def _flow_of(entrypoint: str):
    import importlib.util

    from prefect import Flow

    path, name = entrypoint.split(":")
    assert (ROOT / path).is_file(), f"entrypoint file {path} does not exist"
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    flow = getattr(module, name)
    assert isinstance(flow, Flow), f"{entrypoint} is not a Prefect flow"
    return flow


def test_prefect_yaml_passes_prefects_own_deploy_schema():
    """The model `prefect deploy` validates prefect.yaml with (Prefect 3.9)."""
    from prefect.cli.deploy._models import PrefectYamlModel

    model = PrefectYamlModel.model_validate(_yaml("prefect.yaml"))
    assert {d.name for d in model.deployments} == {"nightly", "dataset", "train"}
    assert all(d.work_pool and d.work_pool.name == "storymem-k8s" for d in model.deployments)


def _job_template() -> dict:
    import json

    return json.loads((INFRA / "prefect-k8s-job-template.json").read_text())


def _prefect_flow_pod(job_variables: dict | None = None) -> dict:
    """The pod spec a flow run of the storymem-k8s pool gets: the base job template with
    its defaults and `job_variables` filled in by Prefect's own templating."""
    from prefect.utilities.templating import apply_values

    template = _job_template()
    values = {name: prop["default"] for name, prop in
              template["variables"]["properties"].items() if "default" in prop}
    values.update(job_variables or {})
    config = apply_values(template["job_configuration"], values)
    return config["job_manifest"]["spec"]["template"]["spec"]


def test_prefect_job_template_passes_prefects_checks_and_runs_the_storymem_image():
    from prefect.server.schemas.actions import validate_base_job_template
    from prefect.utilities.schema_tools import validate

    template = _job_template()
    validate_base_job_template(template)  # every placeholder is a declared variable
    schema = template["variables"]
    defaults = {name: prop["default"] for name, prop in schema["properties"].items()
                if "default" in prop}
    validate(defaults, schema, raise_on_error=True, preprocess=True, ignore_required=True)
    for deployment in _deployments().values():
        variables = deployment["work_pool"]["job_variables"]
        validate(variables, schema, raise_on_error=True, preprocess=True,
                 ignore_required=True)
        (container,) = _prefect_flow_pod(variables)["containers"]
        assert container["image"] == variables["image"] and container["image"] in IMAGES
        assert {"secretRef": {"name": "storymem-s3", "optional": True}} in container["envFrom"]


def test_prefect_deployments_point_at_the_flows_with_valid_parameters():
    from pipelines.batch.spec import BatchOptions
    from storymem_model.specs import ModelSpec, RenderSettings, ScorerSpec

    deployments = _deployments()
    assert set(deployments) == {"nightly", "dataset", "train"}
    expected = {"nightly": "storymem-nightly-render", "dataset": "storymem-generate-dataset"}
    for name, deployment in ((n, d) for n, d in deployments.items() if n in expected):
        flow = _flow_of(deployment["entrypoint"])
        assert flow.name == expected[name]
        params = deployment["parameters"]
        accepted = set(flow.parameters.properties)
        assert set(params) <= accepted, f"{name}: unknown parameters {set(params) - accepted}"
        assert set(flow.parameters.required) <= set(params)
        # Prefect validates the JSON parameters into the flow's typed specs (every field
        # known, every value checked by the spec itself).
        validated = flow.validate_parameters(params)
        assert isinstance(validated["model"], ModelSpec)
        assert isinstance(validated["scorers"], ScorerSpec) and validated["scorers"].has_gate
        assert isinstance(validated["render"], RenderSettings)
        assert isinstance(validated["batch"], BatchOptions)
        assert validated["batch"].gpus_per_worker == 1 and validated["batch"].workers >= 1
        model, scorers = validated["model"], validated["scorers"]
        for path in (model.model_dir, model.t2v_model_dir, model.lora_dir,
                     scorers.clip_checkpoint, scorers.hps_checkpoint, scorers.hps_base_model):
            assert path.startswith("/models/"), path  # the pod's read-only models volume
        assert deployment["work_pool"]["job_variables"]["image"] in IMAGES
        assert deployment["concurrency_limit"] == 1


def test_train_deployment_validates_into_the_training_specs():
    from flows.train_lora import train_lora
    from storymem_model.training.specs import FitSpec, PrepareSpec

    deployment = _deployments()["train"]
    assert _flow_of(deployment["entrypoint"]).name == train_lora.name
    assert "schedules" not in deployment and deployment["concurrency_limit"] == 1
    validated = train_lora.validate_parameters(deployment["parameters"])
    prepare, fit = validated["prepare"], validated["fit"]
    assert isinstance(prepare, PrepareSpec) and isinstance(fit, FitSpec)
    assert fit.data == prepare.out  # the flow trains on what it prepares
    assert fit.expert == "both" and fit.gpus_per_worker == 1 and fit.workers >= 1
    assert prepare.model.model_dir.startswith("/models/") and prepare.scorers.has_gate
    assert (prepare.height, prepare.width, prepare.num_frames) == (480, 832, 81)
    assert deployment["work_pool"]["job_variables"]["image"] in IMAGES


def test_nightly_deployment_is_scheduled_and_targets_the_clusters_job_server():
    from prefect.client.schemas.schedules import CronSchedule

    nightly = _deployments()["nightly"]
    (schedule,) = nightly["schedules"]
    cron = CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])
    assert cron.cron == "0 1 * * *" and schedule["active"] is True
    assert "schedules" not in _deployments()["dataset"]
    cluster = _yaml("kuberay/raycluster.yaml")["metadata"]["name"]
    for name in ("nightly", "dataset"):
        assert _deployments()[name]["parameters"]["ray_address"] == \
            f"http://{cluster}-head-svc:8265"


def test_prefect_yaml_documents_every_parameter_it_sets():
    """Each parameter of the nightly deployment is explained by the flow's docstring,
    the typed ones with the spec they hold."""
    from flows.nightly_render import nightly_render

    doc = nightly_render.fn.__doc__
    for name in _deployments()["nightly"]["parameters"]:
        # a docstring line "name: ..." or "name, other_name: ..."
        assert re.search(rf"^\s*(\w+, )*{name}(, \w+)*:", doc, re.M), name
    for spec in ("ModelSpec", "ScorerSpec", "RenderSettings", "BatchOptions"):
        assert f"`{spec}`" in doc, spec
