"""cluster.yaml is a valid Ray 2.60 AWS cluster config that `ray up` could bootstrap
(docs/architecture.md#running-on-a-cluster).

These tests call Ray's private autoscaler helpers (`prepare_config`, `validate_config`,
`_bootstrap_config`): they are what `ray up` runs before it launches anything, and no public API
checks a cluster config. Private APIs change between releases, which is one reason Ray is pinned to
2.60.0 in pyproject.toml (and in cluster.yaml, see `test_setup_installs_this_project_with_the_pinned_ray`).
The AWS bootstrap runs offline against moto's in-process mock of EC2 and IAM.
"""
from __future__ import annotations

import copy
import ipaddress
import json
import os
import posixpath
import random
import re
import time
import types
from pathlib import Path

import jsonschema
import moto
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
RAY_PIN = re.compile(r"ray\[[a-z,]+\]==([0-9][0-9a-z.]*)")


@pytest.fixture()
def cfg() -> dict:
    with open(ROOT / "cluster.yaml") as fh:
        return yaml.safe_load(fh)


def worker_types(cfg: dict) -> dict:
    return {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}


def test_valid_for_rays_schema(cfg):
    validate_config(prepare_config(copy.deepcopy(cfg)))


def test_schema_check_catches_a_typo(cfg):
    # Shows the check above has teeth: Ray's schema forbids unknown keys in a node type.
    cfg["available_node_types"]["gpu_worker"]["min_worker"] = 0
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        validate_config(prepare_config(cfg))


def test_shape_head_cpu_workers_spot_gpu_workers(cfg):
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # the head runs no tasks
    workers = worker_types(cfg)
    by_instance = {v["node_config"]["InstanceType"]: v for v in workers.values()}
    gpu = by_instance["g5.xlarge"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    assert gpu["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert any(not t.startswith("g") and v["max_workers"] >= 1 for t, v in by_instance.items())
    assert sum(v["max_workers"] for v in workers.values()) <= cfg["max_workers"]
    assert cfg["idle_timeout_minutes"] > 0
    assert cfg["provider"]["type"] == "aws"


def test_setup_installs_this_project_with_the_pinned_ray(cfg):
    # Local paths are relative to the repository root, where `ray up` runs; each must exist.
    shipped = {os.path.normpath(local): remote for remote, local in cfg["file_mounts"].items()}
    assert all((ROOT / local).exists() for local in shipped), f"missing local file_mounts: {shipped}"
    # The package, pyproject.toml (with the readme it names) and the jobs/configs land in one folder ...
    remote_root = posixpath.dirname(shipped["pyproject.toml"])
    readme = re.search(r'^readme\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    needed = ["cliquecnn_ray", "jobs", "configs"] + ([readme.group(1)] if readme else [])
    assert {name: shipped.get(name) for name in needed} == {n: f"{remote_root}/{n}" for n in needed}
    # ... and setup installs it from there.
    setup = "\n".join(cfg["setup_commands"])
    assert re.search(rf"pip install .*-e {re.escape(remote_root)}(\s|$)", setup), setup

    # The Ray installed on the cluster = pyproject's pin = the Ray that runs `ray up` here.
    pyproject_pins = set(RAY_PIN.findall((ROOT / "pyproject.toml").read_text()))
    cluster_pins = set(RAY_PIN.findall(setup))
    assert cluster_pins == pyproject_pins == {ray.__version__}


def test_closed_cluster_ssh_from_one_cidr_dashboard_on_localhost_s3_on_the_run_bucket(cfg):
    text = (ROOT / "cluster.yaml").read_text()
    # Every node in one group the user made: left to Ray, each would get one admitting SSH from 0.0.0.0/0.
    groups = {name: tuple(t["node_config"].get("SecurityGroupIds") or ()) for name, t in
              cfg["available_node_types"].items()}
    assert all(groups.values()) and len(set(groups.values())) == 1, groups
    # The group's one SSH rule admits the one CIDR the user sets (a CHANGE line), not the world.
    (cidr,) = re.findall(r"--port 22 .*\n?#?\s*--cidr (\S+)\s+# CHANGE", text)
    assert ipaddress.ip_network(cidr).num_addresses < 2**8, cidr
    assert "0.0.0.0" not in text
    # The dashboard and job API listen on the head's loopback only (`ray dashboard cluster.yaml` forwards it);
    # token authentication is not switched off.
    starts = "\n".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in starts and "RAY_AUTH_MODE=disabled" not in text
    # Workers carry an instance profile; its documented policy grants S3 on the run bucket and nothing more.
    for name, node_type in worker_types(cfg).items():
        assert node_type["node_config"]["IamInstanceProfile"]["Name"], name
    block = re.search(r'^#\s+(\{"Version".*?\]\})$', text, re.M | re.S).group(1)
    policy = json.loads(re.sub(r"^#\s*", "", block, flags=re.M))
    resources = {r for statement in policy["Statement"] for r in [statement["Resource"]]}
    assert resources == {"arn:aws:s3:::RUN_BUCKET", "arn:aws:s3:::RUN_BUCKET/*"}
    actions = {a for statement in policy["Statement"] for a in statement["Action"]}
    assert actions <= {"s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject"}, actions


class _NoSleep(types.ModuleType):
    """`time` for Ray's AWS config module without its 2 × 15 s waits for IAM propagation."""

    def __init__(self):
        super().__init__("time")
        self.slept = []

    def __getattr__(self, name):
        return getattr(time, name)

    def sleep(self, seconds):
        self.slept.append(seconds)


def test_aws_bootstrap_fills_resources_offline(cfg, tmp_path, monkeypatch):
    from ray.autoscaler._private.aws import config as aws_config
    from ray.autoscaler._private.commands import _bootstrap_config

    # conftest points AWS_ENDPOINT_URL at a local moto *server*; moto's in-process mock only
    # intercepts requests addressed to AWS itself.
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "testing")
    monkeypatch.setenv("MOTO_IAM_LOAD_MANAGED_POLICIES", "true")  # Ray attaches AmazonEC2FullAccess etc.
    monkeypatch.setenv("HOME", str(tmp_path))  # the bootstrap writes ~/.ssh/ray-autoscaler_*.pem
    # Patch the module's `time`, not time.sleep itself: other threads in this process keep sleeping.
    no_sleep = _NoSleep()
    monkeypatch.setattr(aws_config, "time", no_sleep)
    # moto's backends are global to the process, shared with conftest's S3 server: a fresh account
    # gives this test empty EC2/IAM state, and no reset (mock_aws's default) wipes the server's buckets.
    account = f"{random.randrange(10**11, 10**12)}"
    monkeypatch.setenv("MOTO_ACCOUNT_ID", account)

    mock = moto.mock_aws()
    mock.start(reset=False)
    try:
        # The security group cluster.yaml asks the user to make once (SSH from one CIDR), in moto's default VPC.
        import boto3

        ec2 = boto3.client("ec2", region_name=cfg["provider"]["region"])
        vpc = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
        group = ec2.create_security_group(GroupName="cliquecnn", Description="test", VpcId=vpc)["GroupId"]
        ec2.authorize_security_group_ingress(GroupId=group, IpProtocol="tcp", FromPort=22, ToPort=22,
                                             CidrIp="203.0.113.7/32")
        cfg = copy.deepcopy(cfg)
        for node_type in cfg["available_node_types"].values():
            node_type["node_config"]["SecurityGroupIds"] = [group]
        out = _bootstrap_config(copy.deepcopy(cfg), no_config_cache=True)
    finally:
        mock.stop(remove_data=False)
    assert no_sleep.slept, "Ray's IAM wait moved: find it in ray/autoscaler/_private/aws/config.py"

    types_out = out["available_node_types"]
    assert set(types_out) == set(cfg["available_node_types"])
    for name, node_type in types_out.items():
        assert node_type["resources"], f"{name}: resources not filled"
        node_config = node_type["node_config"]
        assert node_config["SubnetIds"] and node_config["SecurityGroupIds"] and node_config["KeyName"], name
    head = types_out[out["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # autodetected CPU 4 overridden by the config
    by_instance = {v["node_config"]["InstanceType"]: v["resources"] for k, v in types_out.items()
                   if k != out["head_node_type"]}
    assert by_instance["g5.xlarge"]["GPU"] == 1 and by_instance["g5.xlarge"]["CPU"] == 4
    assert by_instance["g5.xlarge"]["accelerator_type:A10G"] == 1
    assert by_instance["m6i.2xlarge"]["CPU"] == 8 and "GPU" not in by_instance["m6i.2xlarge"]
    assert by_instance["m6i.2xlarge"]["memory"] > 16 * 2**30
    # Ray created the head's instance profile (EC2 + S3 access) and an SSH key under the fake HOME.
    assert out["head_node"]["IamInstanceProfile"]["Arn"] == (
        f"arn:aws:iam::{account}:instance-profile/ray-autoscaler-v1"
    )
    assert Path(out["auth"]["ssh_private_key"]).expanduser().is_file()
    assert types_out["gpu_worker"]["node_config"]["InstanceMarketOptions"] == {"MarketType": "spot"}
