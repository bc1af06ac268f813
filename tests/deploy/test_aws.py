"""deploy/aws/realtime.yaml, the CloudFormation template of the AWS deployment
(deploy/aws/README.md): cfn-lint finds nothing in it, and its numbers agree with
the app's (project/settings.py, deploy/cluster.py Worker.command(), the long poll).

No AWS account and no network: cfn-lint checks the template against the resource
schemas it ships; the rest reads the template. Nothing here deploys anything.
"""

from __future__ import annotations

import http.server
import ipaddress
import json
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from django.conf import settings

from deploy.cluster import Worker

TEMPLATE = Path(__file__).resolve().parents[2] / "deploy" / "aws" / "realtime.yaml"
ANYWHERE = {"0.0.0.0/0", "::/0"}


@pytest.fixture(scope="module")
def template() -> dict:
    from cfnlint.decode import decode

    data, errors = decode(str(TEMPLATE))
    assert not errors, [str(e) for e in errors]
    return data


def resources(template: dict, kind: str) -> dict[str, dict]:
    return {name: r.get("Properties", {}) for name, r in template["Resources"].items() if r["Type"] == kind}


def one(template: dict, kind: str) -> dict:
    found = resources(template, kind)
    assert len(found) == 1, f"expected one {kind}, found {sorted(found)}"
    return next(iter(found.values()))


def attributes(props: dict, key: str) -> dict[str, str]:
    return {a["Key"]: str(a["Value"]) for a in props.get(key, [])}


def worker_container(template: dict) -> dict:
    task = template["Resources"]["WorkerTaskDefinition"]["Properties"]
    (container,) = task["ContainerDefinitions"]
    return container


def environment(container: dict) -> dict:
    return {e["Name"]: e["Value"] for e in container.get("Environment", [])}


def cluster_command() -> list[str]:
    """deploy/cluster.py Worker.command(), the one source of the worker's flags
    (called on a stand-in: a real Worker makes a certificate with openssl)."""
    stand_in = SimpleNamespace(port=8001, tls_port=8443, key="key.pem", cert="cert.pem")
    return Worker.command(stand_in)


def flags(argv: list[str]) -> dict[str, str]:
    """`--name value` pairs of a daphne command line (`-b`, `-p`, `-e` included)."""
    pairs = {}
    for i, arg in enumerate(argv):
        if arg.startswith("-") and i + 1 < len(argv):
            pairs[arg] = argv[i + 1]
    return pairs


def drain_seconds(container: dict) -> float:
    """The longest a worker's drain takes: REALTIME_DRAIN_TIMEOUT plus the spread
    over which it closes its sockets, the larger of the app's settings and what
    the template gives the workers."""
    env = environment(container)
    timeout = max(settings.REALTIME["DRAIN_TIMEOUT"], float(env.get("REALTIME_DRAIN_TIMEOUT", 0)))
    spread = max(settings.REALTIME["DRAIN_SPREAD"], float(env.get("REALTIME_DRAIN_SPREAD", 0)))
    return timeout + spread


# --------------------------------------------------------------------------- lint


def test_cfn_lint_finds_no_error_and_no_warning():
    from cfnlint.api import lint_file

    # No rule is ignored: every finding, error or warning, fails this test.
    matches = lint_file(TEMPLATE)
    assert not matches, "\n".join(f"{m.rule.id} {m.message} (line {m.linenumber})" for m in matches)


# --------------------------------------------------------------------------- the balancer


def test_deregistration_delay_outlasts_the_drain(template):
    tg = attributes(one(template, "AWS::ElasticLoadBalancingV2::TargetGroup"), "TargetGroupAttributes")
    delay = float(tg["deregistration_delay.timeout_seconds"])
    assert delay > drain_seconds(worker_container(template)), (
        "the ALB would cut a draining worker's sockets before its drain closes them with 4012"
    )


def test_idle_timeout_outlasts_the_pings_and_the_long_poll(template):
    from realtime.web.longpoll import MAX_WAIT

    lb = attributes(one(template, "AWS::ElasticLoadBalancingV2::LoadBalancer"), "LoadBalancerAttributes")
    idle = float(lb["idle_timeout.timeout_seconds"])
    worker = flags(cluster_command())
    ping_interval, ping_timeout = float(worker["--ping-interval"]), float(worker["--ping-timeout"])
    assert idle > ping_interval, "the ALB would close a healthy idle socket between two pings"
    assert idle > ping_interval + ping_timeout, "the ALB, not the worker, would decide a silent peer is dead"
    assert idle > MAX_WAIT, "the ALB would cut a held long poll (504)"
    # The ALB reuses its connections to a worker: the worker must keep an idle one
    # longer than the ALB, or a request the ALB sends as the worker closes it is a 502.
    handshake = float(environment(worker_container(template))["REALTIME_HANDSHAKE_TIMEOUT"])
    assert handshake > idle


def test_health_check_is_readyz_with_200(template):
    tg = one(template, "AWS::ElasticLoadBalancingV2::TargetGroup")
    assert tg["HealthCheckPath"] == "/readyz"
    assert tg["HealthCheckProtocol"] == "HTTP"
    assert str(tg["Matcher"]["HttpCode"]) == "200"
    assert int(tg["HealthyThresholdCount"]) >= 2 and int(tg["UnhealthyThresholdCount"]) >= 2
    # Each of /readyz's checks may take REALTIME_READY_TIMEOUT; the ALB must wait longer.
    assert float(tg["HealthCheckTimeoutSeconds"]) > settings.REALTIME_READY_TIMEOUT
    assert float(tg["HealthCheckTimeoutSeconds"]) < float(tg["HealthCheckIntervalSeconds"])


def test_stickiness_is_an_lb_cookie(template):
    tg = attributes(one(template, "AWS::ElasticLoadBalancingV2::TargetGroup"), "TargetGroupAttributes")
    assert tg["stickiness.enabled"] == "true"
    assert tg["stickiness.type"] == "lb_cookie"
    assert int(tg["stickiness.lb_cookie.duration_seconds"]) > 0


def test_http_redirects_to_https_with_301_and_https_pins_a_tls13_policy(template):
    listeners = resources(template, "AWS::ElasticLoadBalancingV2::Listener")
    by_protocol = {props["Protocol"]: props for props in listeners.values()}
    assert set(by_protocol) == {"HTTP", "HTTPS"}
    (action,) = by_protocol["HTTP"]["DefaultActions"]
    assert action["Type"] == "redirect"
    assert action["RedirectConfig"]["Protocol"] == "HTTPS"
    assert str(action["RedirectConfig"]["Port"]) == "443"
    assert action["RedirectConfig"]["StatusCode"] == "HTTP_301"
    https = by_protocol["HTTPS"]
    assert int(https["Port"]) == 443
    assert https["SslPolicy"].startswith("ELBSecurityPolicy-TLS13-"), "CloudFormation's default allows TLS 1.0"
    assert https["Certificates"] == [{"CertificateArn": {"Ref": "CertificateArn"}}]


# --------------------------------------------------------------------------- the workers


def test_worker_command_has_the_cluster_workers_flags(template):
    container = worker_container(template)
    command = [str(arg) for arg in container["Command"]]
    reference = cluster_command()
    assert command[:3] == ["python", "-m", "realtime.server"]
    assert command[-1] == reference[-1] == "project.asgi:application"
    ours, theirs = flags(command), flags(reference)
    # Where to listen differs (every interface of the task, no TLS endpoint: TLS
    # ends at the ALB); every other flag is the cluster worker's, value for value.
    for where in ("-b", "-p", "-e"):
        theirs.pop(where, None)
    assert ours.pop("-b") == "0.0.0.0"
    port = int(ours.pop("-p"))
    assert ours == theirs
    # One port everywhere: the container, the target group, the service, the groups.
    assert [m["ContainerPort"] for m in container["PortMappings"]] == [port]
    assert int(one(template, "AWS::ElasticLoadBalancingV2::TargetGroup")["Port"]) == port
    (binding,) = one(template, "AWS::ECS::Service")["LoadBalancers"]
    assert int(binding["ContainerPort"]) == port and binding["ContainerName"] == container["Name"]
    worker_ingress = [rule for group, rule in ingress_rules(template) if group == "WorkerSecurityGroup"]
    assert [(int(r["FromPort"]), int(r["ToPort"])) for r in worker_ingress] == [(port, port)]


def test_stop_timeout_outlasts_the_drain(template):
    container = worker_container(template)
    stop = float(container["StopTimeout"])
    assert stop > drain_seconds(container), "ECS would SIGKILL a worker in the middle of its drain"
    assert stop <= 120, "Fargate's longest stop timeout"


def test_worker_environment_is_production(template):
    container = worker_container(template)
    env = environment(container)
    assert env["DJANGO_DEBUG"] == "0"
    assert env["DJANGO_BEHIND_TLS_PROXY"] == "1"
    assert env["DJANGO_ALLOWED_HOSTS"] == {"Ref": "DomainName"}
    assert env["DJANGO_ALLOWED_ORIGINS"] == {"Fn::Sub": "https://${DomainName}"}
    assert env["REALTIME_TRUSTED_PROXIES"] == {"Fn::Join": [",", {"Ref": "PublicSubnetCidrs"}]}
    secrets = {s["Name"]: s["ValueFrom"] for s in container["Secrets"]}
    assert set(secrets) == {"DJANGO_SECRET_KEY", "DATABASE_URL", "REDIS_URL"}
    assert not set(secrets) & set(env), "a secret also given in plain text"
    # No secret in the template: the key is a reference, the URLs are made here.
    assert secrets["DJANGO_SECRET_KEY"] == {"Ref": "DjangoSecretKeyArn"}
    assert template["Parameters"]["DjangoSecretKeyArn"]["AllowedPattern"].startswith("^arn:")
    for name in ("DATABASE_URL", "REDIS_URL"):
        secret = template["Resources"][secrets[name]["Ref"]]
        assert secret["Type"] == "AWS::SecretsManager::Secret"
    redis_url = template["Resources"]["RedisUrl"]["Properties"]["SecretString"]["Fn::Sub"][0]
    assert redis_url.startswith("rediss://"), "ElastiCache takes TLS only (TransitEncryptionEnabled)"
    db_url = template["Resources"]["DatabaseUrl"]["Properties"]["SecretString"]["Fn::Sub"][0]
    assert db_url.startswith("postgres://") and "sslmode=require" in db_url
    logs = container["LogConfiguration"]
    assert logs["LogDriver"] == "awslogs"


def test_managed_stores_are_private_and_encrypted(template):
    db = one(template, "AWS::RDS::DBInstance")
    assert db["StorageEncrypted"] is True and db["PubliclyAccessible"] is False
    redis = one(template, "AWS::ElastiCache::ReplicationGroup")
    assert redis["TransitEncryptionEnabled"] is True and redis["AtRestEncryptionEnabled"] is True


# --------------------------------------------------------------------------- security groups


def ingress_rules(template: dict) -> list[tuple[str, dict]]:
    """(group's logical name, rule) for every ingress rule, inline or a resource."""
    rules = []
    for name, props in resources(template, "AWS::EC2::SecurityGroup").items():
        rules += [(name, rule) for rule in props.get("SecurityGroupIngress", [])]
    for props in resources(template, "AWS::EC2::SecurityGroupIngress").values():
        rules.append((props["GroupId"]["Ref"], props))
    return rules


def test_only_the_alb_takes_traffic_from_anywhere_and_only_on_80_and_443(template):
    rules = ingress_rules(template)
    assert rules
    open_to_all = set()
    for group, rule in rules:
        cidr = rule.get("CidrIp") or rule.get("CidrIpv6")
        if cidr is not None and (cidr in ANYWHERE or ipaddress.ip_network(cidr).prefixlen == 0):
            open_to_all.add((group, rule["IpProtocol"], int(rule["FromPort"]), int(rule["ToPort"])))
    assert open_to_all == {("AlbSecurityGroup", "tcp", 80, 80), ("AlbSecurityGroup", "tcp", 443, 443)}


def test_workers_database_and_redis_take_only_their_port_from_the_one_group_before_them(template):
    expected = {
        "WorkerSecurityGroup": "AlbSecurityGroup",
        "DatabaseSecurityGroup": "WorkerSecurityGroup",
        "RedisSecurityGroup": "WorkerSecurityGroup",
    }
    ports = {"DatabaseSecurityGroup": 5432, "RedisSecurityGroup": 6379}
    seen = {}
    for group, rule in ingress_rules(template):
        if group == "AlbSecurityGroup":
            continue
        assert "CidrIp" not in rule and "CidrIpv6" not in rule, f"{group} takes traffic from a network"
        assert rule["SourceSecurityGroupId"] == {"Ref": expected[group]}, group
        assert rule["IpProtocol"] == "tcp" and int(rule["FromPort"]) == int(rule["ToPort"])
        seen.setdefault(group, []).append(int(rule["FromPort"]))
    assert set(seen) == set(expected)
    for group, port in ports.items():
        assert seen[group] == [port]
    # The stores are in private subnets only, as are the workers (no public address).
    service = one(template, "AWS::ECS::Service")["NetworkConfiguration"]["AwsvpcConfiguration"]
    assert service["AssignPublicIp"] == "DISABLED"
    assert service["Subnets"] == {"Ref": "PrivateSubnetIds"}


# --------------------------------------------------------------------------- the entry point


class _Metadata(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"TaskARN": "arn:aws:ecs:eu-west-1:123456789012:task/realtime/0123abcd"}).encode()
        self.send_response(200 if self.path == "/v4/meta/task" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_entry_point_names_the_worker_after_its_task_and_execs_the_server(template, tmp_path):
    """The worker container's EntryPoint (a shell line) against a stand-in for the
    ECS task metadata endpoint on 127.0.0.1: REALTIME_WORKER_ID is the task's id,
    and the command replaces the shell (so SIGTERM reaches the server)."""
    script = worker_container(template)["EntryPoint"]
    assert script[:2] == ["sh", "-c"]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Metadata)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        python = Path(sys.executable).parent
        env = {"PATH": f"{python}:/usr/bin:/bin",
               "ECS_CONTAINER_METADATA_URI_V4": f"http://127.0.0.1:{server.server_address[1]}/v4/meta"}
        child = "import os; print(os.environ.get('REALTIME_WORKER_ID'), os.getpid())"
        proc = subprocess.Popen([*script, "python", "-c", child], env=env, stdout=subprocess.PIPE, text=True)
        out, _ = proc.communicate(timeout=30)
        worker_id, pid = out.split()
        assert worker_id == "0123abcd"
        assert int(pid) == proc.pid, "the shell did not exec the command"
        # No metadata endpoint: the id is left to the settings' default (host-pid).
        env.pop("ECS_CONTAINER_METADATA_URI_V4")
        out = subprocess.run([*script, "python", "-c", child], env=env, capture_output=True, text=True,
                             timeout=30).stdout
        assert out.split()[0] == "None"
    finally:
        server.shutdown()
        server.server_close()
