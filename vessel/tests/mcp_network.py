"""The network tools of `vessel mcp`, driven by the official MCP Python SDK
(an independent client) inside the fake internet. Started by
tests/network.rs:

    python mcp_network.py VESSEL_BIN ARG...   (the args before `mcp`)

Prints a transcript line per call; exits non-zero on the first surprise.
"""

import asyncio
import os
import sys
import urllib.request

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp_client import calls, check

GET = "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {} 80 | tail -n 1"




async def main():
    vessel, args = sys.argv[1], sys.argv[2:]
    params = StdioServerParameters(command=vessel, args=args + ["mcp"], env=dict(os.environ))
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as s:
            await s.initialize()
            tools = {t.name for t in (await s.list_tools()).tools}
            check({"set_network", "publish_port", "network_info"} <= tools, f"tools {tools}")

            call, good = calls(s)

            async def get(v, host):
                r = await good("exec", vessel_id=v, shell=GET.format(host))
                return r["stdout"].strip()

            r = await call("create_vessel", image="local/busybox:latest", network="allow", allow=["bad name"])
            check(r.is_error, "a bad rule is refused")
            v = (await good("create_vessel", image="local/busybox:latest", network="allow",
                            allow=["pypi.test"]))["vessel_id"]
            listed = await good("list_vessels")
            check(any(x["vessel_id"] == v and x["network"] == "allow,pypi.test" for x in listed["vessels"]),
                  f"list_vessels shows the policy: {listed}")
            check(await get(v, "pypi.test") == "192.0.2.10", "an allowed name works")
            check(await get(v, "evil.test") == "", "another name does not")
            info = await good("network_info", vessel_id=v)
            check("evil.test" in info["refused_names"], f"the refusal is readable: {info}")
            info = await good("set_network", vessel_id=v, network="open")
            check(info["mode"] == "open", f"set_network: {info}")
            check(await get(v, "203.0.113.5") == "203.0.113.5", "open reaches a public address")
            check(await get(v, "10.99.0.5") == "", "and not a private one")
            await good("exec", vessel_id=v, background=True,
                       shell="mkdir -p /www && echo from-mcp > /www/index.html && exec httpd -f -p 8000 -h /www")
            await asyncio.sleep(0.5)
            url = (await good("publish_port", vessel_id=v, port=8000))["url"]
            body = urllib.request.urlopen(url, timeout=5).read().decode().strip()
            check(body == "from-mcp", f"the published port serves the host: {body!r}")
            check((await good("publish_port", vessel_id=v, port=8000, remove=True))["removed"], "unpublished")
            await good("delete_vessel", vessel_id=v)
    print("session ok", flush=True)


asyncio.run(main())
