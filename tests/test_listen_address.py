"""Every listener binds to the address it was given, never to all interfaces (issue 10, security part 3).

The operator's /metrics and readiness /healthz listen on `RunOptions.metrics_host`: the pod IP
when the chart passes $POD_IP, else 127.0.0.1, so a process on another interface of the node
cannot read the operator's decisions unless someone asks for it. On Linux every 127.x address is
loopback, so a server bound to 127.0.0.1 alone refuses 127.0.0.2: that is what these tests check,
with real sockets.
"""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import pytest
from variant_autoscaler.exporter import Exporter, MetricsServer
from variant_autoscaler.operator import RunOptions, default_metrics_host


def _connects(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(2.0)
        try:
            s.connect((host, port))
        except (ConnectionRefusedError, TimeoutError, OSError):
            return False
        return True


@pytest.mark.parametrize("bound, other", [("127.0.0.1", "127.0.0.2"), ("127.0.0.2", "127.0.0.1")])
def test_metrics_listener_answers_on_its_address_only(bound, other):
    async def scenario():
        server = await MetricsServer(Exporter(), host=bound, port=0).start()
        try:
            async with aiohttp.ClientSession() as session, \
                    session.get(f"http://{bound}:{server.port}/metrics", timeout=aiohttp.ClientTimeout(total=5)) as r:
                status = r.status
            return server.port, status, _connects(bound, server.port), _connects(other, server.port)
        finally:
            await server.stop()

    port, status, on_bound, on_other = asyncio.run(scenario())
    assert status == 200 and on_bound
    assert not on_other, f"/metrics bound to {bound} also answered on {other}:{port}"


def test_default_address_is_the_pod_ip_else_loopback_never_all_interfaces():
    assert default_metrics_host({}) == "127.0.0.1"
    assert default_metrics_host({"POD_IP": "10.1.2.3"}) == "10.1.2.3"
    assert RunOptions.from_env({}).metrics_host not in ("0.0.0.0", "", "::")
    assert RunOptions.from_env({"VARIANT_AUTOSCALER_METRICS_HOST": "127.0.0.3"}).metrics_host == "127.0.0.3"
