"""The Slurm and KubeRay files in deploy/: the sbatch script's bootstrap on one node (a real Ray head,
a real tiny sweep attached to it) with Slurm's variables set, its refusals without shared storage, and
the RayJob manifest against the fields KubeRay documents."""

import os
import shlex
import signal
import subprocess
import uuid

import pytest
import yaml
from helpers import REPO, child_runs
from mlflow.tracking import MlflowClient

from polypythia.net import free_port

SBATCH = REPO / "deploy" / "slurm" / "polypythia.sbatch"
RAYJOB = REPO / "deploy" / "kuberay" / "rayjob.yaml"

# The json fields of KubeRay's v1 API (ray-project/kuberay, ray-operator/apis/ray/v1/rayjob_types.go at
# f6ef3f7 and raycluster_types.go at 3275ee0): RayJobSpec, RayClusterSpec, HeadGroupSpec, WorkerGroupSpec.
RAYJOB_SPEC = {
    "activeDeadlineSeconds",
    "backoffLimit",
    "rayClusterSpec",
    "submitterPodTemplate",
    "metadata",
    "clusterSelector",
    "submitterConfig",
    "managedBy",
    "deletionPolicy",
    "entrypoint",
    "runtimeEnvYAML",
    "jobId",
    "submissionMode",
    "entrypointResources",
    "entrypointNumCpus",
    "entrypointNumGpus",
    "ttlSecondsAfterFinished",
    "shutdownAfterJobFinishes",
    "suspend",
}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode"}
RAYCLUSTER_SPEC = {
    "suspend",
    "managedBy",
    "autoscalerOptions",
    "headServiceAnnotations",
    "enableInTreeAutoscaling",
    "gcsFaultToleranceOptions",
    "headGroupSpec",
    "rayVersion",
    "workerGroupSpecs",
}
HEAD_GROUP = {"template", "headService", "enableIngress", "rayStartParams", "serviceType"}
WORKER_GROUP = {
    "suspend",
    "groupName",
    "replicas",
    "minReplicas",
    "maxReplicas",
    "idleTimeoutSeconds",
    "rayStartParams",
    "template",
    "scaleStrategy",
    "numOfHosts",
}


def sbatch(tmp_path, *args, env_extra=None, timeout=600):
    """The script as sbatch runs it on the first node of a one-node allocation (Slurm's variables set)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "POLYPYTHIA_HOME"}
    env.update(
        {
            "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NODELIST": "localhost",
            "SLURM_NNODES": "1",
            "SLURM_SUBMIT_DIR": str(REPO),
            "POLYPYTHIA_HEAD_IP": "127.0.0.1",
            "RAY_AUTH_MODE": "disabled",
            "POLYPYTHIA_RAY_PORT": str(free_port()),
            **(env_extra or {}),
        }
    )
    proc = subprocess.Popen(
        ["bash", str(SBATCH), *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # as Slurm does at the time limit: the script stops its Ray cluster
        stdout, stderr = proc.communicate(timeout=60)
        pytest.fail(f"the sbatch script ran over {timeout} s: {stdout[-2000:]}{stderr[-2000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def test_the_sbatch_script_parses():
    assert subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True).returncode == 0


@pytest.mark.parametrize(
    "home, message",
    [
        (None, "POLYPYTHIA_HOME is not set; set it to a folder on storage every node of the allocation mounts"),
        ("relative/home", "is a relative path"),
        ("/dev/shm/polypythia-sbatch-test", "is on tmpfs, this node's memory, which no other node sees"),
    ],
)
def test_an_sbatch_run_without_shared_storage_is_one_line(tmp_path, home, message):
    out = sbatch(tmp_path, "-m", "seed=1", env_extra={"POLYPYTHIA_HOME": home} if home else {}, timeout=60)
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.strip().splitlines() == [next(line for line in out.stderr.splitlines() if message in line)]
    assert out.stderr.startswith("polypythia: error: ") and "ray" not in out.stdout.lower()


@pytest.mark.integration
def test_the_sbatch_script_starts_ray_on_one_node_and_runs_the_sweep_there(tmp_path, mlflow_uri, cache_dir):
    study = f"slurm-{uuid.uuid4().hex[:8]}"
    home = tmp_path / "shared"
    out = sbatch(
        tmp_path,
        "-m",
        "seed=1",
        "model=tiny",
        "budget=smoke",
        "train.eval_every_checkpoint=false",
        "tracking.system_metrics=false",
        f"study={study}",
        f"data.cache_dir={cache_dir}",
        env_extra={"POLYPYTHIA_HOME": str(home), "MLFLOW_TRACKING_URI": mlflow_uri},
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Ray cluster at 127.0.0.1:" in out.stdout and "1 node(s)" in out.stdout
    assert "tiny-seed1: finished" in out.stdout
    _, children = child_runs(MlflowClient(mlflow_uri), study)
    assert [c.info.status for c in children] == ["FINISHED"]
    assert children[0].data.tags["run_dir"].startswith(str(home / "runs"))  # the runs live on the shared folder
    assert (home / "ray-head-4242.log").is_file()


def test_the_rayjob_manifest_uses_the_fields_kuberay_documents(tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir
    from ray.runtime_env import RuntimeEnv

    import polypythia.config.jobconfig  # noqa: F401 - registers the defaults conf/config.yaml starts from

    job = yaml.safe_load(RAYJOB.read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert set(spec) <= RAYJOB_SPEC and spec["submissionMode"] in SUBMISSION_MODES
    cluster = spec["rayClusterSpec"]
    assert set(cluster) <= RAYCLUSTER_SPEC and set(cluster["headGroupSpec"]) <= HEAD_GROUP
    assert {"template", "rayStartParams"} <= set(cluster["headGroupSpec"])
    for group in cluster["workerGroupSpecs"]:
        assert set(group) <= WORKER_GROUP and {
            "groupName",
            "minReplicas",
            "maxReplicas",
            "rayStartParams",
            "template",
        } <= set(group)
    for params in [cluster["headGroupSpec"]["rayStartParams"]] + [
        g["rayStartParams"] for g in cluster["workerGroupSpecs"]
    ]:
        assert all(isinstance(v, str) for v in params.values())  # map[string]string
    env = RuntimeEnv(**yaml.safe_load(spec["runtimeEnvYAML"]))["env_vars"]  # Ray's own validation of a runtime env
    assert env["MLFLOW_TRACKING_URI"].startswith("http") and os.path.isabs(env["POLYPYTHIA_HOME"])
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:  # every pod mounts the one shared volume where POLYPYTHIA_HOME lies, and runs the same image
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
        for container in pod["containers"]:
            mounts = [m["mountPath"] for m in container["volumeMounts"] if claims.get(m["name"]) == "polypythia-shared"]
            assert any(env["POLYPYTHIA_HOME"].startswith(m.rstrip("/") + "/") for m in mounts), container["name"]
    assert len({c["image"] for pod in pods for c in pod["containers"]}) == 1
    command = shlex.split(spec["entrypoint"])
    assert command[:2] == ["python", "/app/launch.py"] and command[2] == "-m"
    monkeypatch.setenv("POLYPYTHIA_HOME", str(tmp_path))
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=command[3:])  # the sweep's overrides compose
    assert cfg.launcher.address == "auto" and cfg.launcher.num_gpus_per_job == 1
