"""`make demo [BACKEND=host-gw|vxlan|udp]`: a two-host lab, shown step by step, then torn down.

Builds an underlay bridge with etcd on it and two host namespaces, runs one tweed per
host, gives each host a docker0 bridge and a container from its subnet.env, prints both
subnet.env files, the routes tweed programmed, and a ping from container to container.
Everything is removed at the end, also when a step fails.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from tests.lab.agents import Agent, put_config, routes, wait_for
from tests.support.netns import Lab


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def main(backend: str = "host-gw") -> int:
    lab = Lab()
    try:
        with tempfile.TemporaryDirectory(prefix="tweed-demo-") as tmp:
            say("underlay bridge 192.168.100.0/24 with etcd on 192.168.100.254")
            etcd = lab.start_etcd()
            put_config(etcd, backend=backend, network="10.5.0.0/16")
            print(etcd.get("/coreos.com/network/config"))
            hosts, agents, containers = [], [], []
            for i in (1, 2):
                host = lab.add_host(i)
                agent = Agent(host, etcd.client_url, Path(tmp)).start()
                env = agent.wait_env()
                host.add_docker0(env["FLANNEL_SUBNET"], int(env["FLANNEL_MTU"]))
                containers.append(host.add_container("a", int(env["FLANNEL_MTU"])))
                hosts.append(host)
                agents.append(agent)
            for agent in agents:
                say(f"{agent.host.ns}: {agent.subnet_file.name}")
                print(agent.subnet_file.read_text(), end="")
            h1, h2 = hosts
            # udp routes the whole Network into flannel0; the others route each peer.
            def shown(host, other):
                return routes(host, "10.5.0.0/16" if backend == "udp" else other.subnet)

            wait_for(lambda: "dev" in shown(h1, agents[1]), what="route on host 1")
            wait_for(lambda: "dev" in shown(h2, agents[0]), what="route on host 2")
            for host, other in ((h1, agents[1]), (h2, agents[0])):
                say(f"route on {host.ns} to the other host's containers")
                print(shown(host, other))
                if backend == "vxlan":
                    print(host.exec(["ip", "neigh", "show", "dev", "flannel.1"]).stdout, end="")
                    print(host.exec(["bridge", "fdb", "show", "dev", "flannel.1"]).stdout, end="")
            say("leases in etcd")
            for key, value in sorted(etcd.get_prefix("/coreos.com/network/subnets/").items()):
                print(f"{key} {value}")
            c1, c2 = containers
            say(f"ping from the container on host 1 ({c1.ip}) to the one on host 2 ({c2.ip})")
            res = c1.exec(["ping", "-c", "3", "-i", "0.2", "-W", "2", c2.ip], check=False)
            print(res.stdout, end="")
            if res.returncode != 0:
                print("demo: ping failed", file=sys.stderr)
                return 1
            for agent in agents:
                agent.stop()
            say("done; tearing the lab down")
            return 0
    finally:
        lab.close()


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:2]))
