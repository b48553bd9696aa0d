"""A whole agent-like session against `vessel mcp` over stdio, driven by the
official MCP Python SDK (an independent client). Started by tests/mcp.rs:

    python session.py VESSEL_BIN ARG...   (the args before `mcp`)

Prints a transcript line per call; exits non-zero on the first surprise.
"""

import asyncio
import base64
import os
import sys

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp_client import calls, check

EXPECTED_TOOLS = {
    "create_vessel", "list_vessels", "delete_vessel", "exec", "read_file", "write_file", "list_dir",
    "stat", "delete_file", "move_file", "create_snapshot", "list_snapshots", "restore_snapshot",
    "delete_snapshot",
}




async def main():
    vessel, args = sys.argv[1], sys.argv[2:]
    params = StdioServerParameters(command=vessel, args=args + ["mcp", "--max-output", "4k"], env=dict(os.environ))
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as s:
            init = await s.initialize()
            check(init.server_info.name == "vessel", f"server name {init.server_info.name}")
            tools = {t.name: t for t in (await s.list_tools()).tools}
            check(EXPECTED_TOOLS <= set(tools), f"missing tools {EXPECTED_TOOLS - set(tools)}")
            for t in tools.values():
                check(t.description and len(t.description) > 20, f"{t.name} has no description")
                props = t.input_schema.get("properties", {})
                for name, p in props.items():
                    check(p.get("description"), f"{t.name}.{name} has no description")
            check("shell" in tools["exec"].input_schema["properties"], "exec takes a shell string")

            call, good = calls(s)

            v = (await good("create_vessel", image="local/busybox:latest", work_dir="/work"))["vessel_id"]
            listed = await good("list_vessels")
            check([x["vessel_id"] for x in listed["vessels"]] == [v], f"list_vessels: {listed}")

            await good("write_file", vessel_id=v, path="src/app.sh", content="echo hello from the app\n",
                       mode="755")
            blob = bytes(range(256))
            await good("write_file", vessel_id=v, path="data.bin", content=base64.b64encode(blob).decode(),
                       encoding="base64")
            got = await good("read_file", vessel_id=v, path="data.bin")
            check(got["encoding"] == "base64" and base64.b64decode(got["content"]) == blob, f"binary: {got}")
            r = await good("exec", vessel_id=v, command=["sh", "src/app.sh"])
            check(r["exit_code"] == 0 and r["stdout"] == "hello from the app\n", f"exec: {r}")
            r = await good("exec", vessel_id=v, shell="cd src && pwd && echo $GREETING >&2 && cat; exit 3",
                           env={"GREETING": "hi"}, stdin="piped in\n")
            check(r["exit_code"] == 3 and r["stdout"] == "/work/src\npiped in\n" and r["stderr"] == "hi\n",
                  f"exec shell: {r}")
            r = await good("exec", vessel_id=v, shell="ls", cwd="/work/src")
            check(r["stdout"] == "app.sh\n", f"cwd: {r}")
            st = await good("stat", vessel_id=v, path="src/app.sh")
            check(st["type"] == "file" and st["mode"] == "755" and st["size"] == 24, f"stat: {st}")
            d = await good("list_dir", vessel_id=v, path=".")
            check([e["name"] for e in d["entries"]] == ["data.bin", "src"], f"list_dir: {d}")

            good_snap = (await good("create_snapshot", vessel_id=v, message="app works"))["snapshot_id"]
            # Break it, as an agent's bad step would.
            await good("exec", vessel_id=v, shell="rm -rf src && echo broken > data.bin")
            await good("move_file", vessel_id=v, **{"from": "data.bin", "to": "moved.bin"})
            r = await good("exec", vessel_id=v, shell="ls")
            check(r["stdout"] == "moved.bin\n", f"broken state: {r}")
            bad_snap = (await good("create_snapshot", vessel_id=v, message="broken"))["snapshot_id"]
            snaps = await good("list_snapshots", vessel_id=v)
            check(snaps["current_snapshot_id"] == bad_snap and len(snaps["snapshots"]) == 3, f"snapshots: {snaps}")
            check("<- current" in snaps["tree"], f"tree: {snaps['tree']}")

            await good("restore_snapshot", vessel_id=v, snapshot_id=good_snap)
            got = await good("read_file", vessel_id=v, path="src/app.sh")
            check(got["encoding"] == "text" and got["content"] == "echo hello from the app\n", f"restored: {got}")
            r = await good("exec", vessel_id=v, command=["sh", "src/app.sh"])
            check(r["stdout"] == "hello from the app\n", f"after restore: {r}")
            await good("delete_snapshot", vessel_id=v, snapshot_id=bad_snap)
            snaps = await good("list_snapshots", vessel_id=v)
            check(len(snaps["snapshots"]) == 2, f"after delete_snapshot: {snaps}")
            await good("delete_file", vessel_id=v, path="src", recursive=True)
            r = await call("stat", vessel_id=v, path="src")
            check(r.is_error and r.content[0].text.startswith("NotFound"), f"deleted dir: {r.content}")

            # Output over the cap keeps its start and end around the marker.
            r = await good("exec", vessel_id=v, shell="seq 1 100000")
            check(r["truncated"] and r["stdout"].startswith("1\n2\n") and r["stdout"].endswith("99999\n100000\n")
                  and "[vessel: output truncated" in r["stdout"] and len(r["stdout"]) < 4096 + 200,
                  f"capped output: {len(r['stdout'])} chars")
            # Bad input: typed tool errors, and the session goes on.
            r = await call("exec", vessel_id="0000000000000000", command=["true"])
            check(r.is_error and r.content[0].text.startswith("NotFound"), f"unknown vessel: {r.content}")
            r = await call("exec", vessel_id=v, command=["no-such-program"])
            check(r.is_error and r.content[0].text.startswith("NotFound"), f"missing program: {r.content}")
            r = await call("exec", vessel_id=v)
            check(r.is_error and r.content[0].text.startswith("InvalidInput"), f"no command: {r.content}")
            r = await call("read_file", vessel_id=v, path="bad\u0000path")
            check(r.is_error and r.content[0].text.startswith("InvalidInput"), f"NUL path: {r.content}")
            r = await call("restore_snapshot", vessel_id=v, snapshot_id="../../x")
            check(r.is_error and r.content[0].text.startswith("InvalidInput"), f"bad snapshot id: {r.content}")
            try:
                r = await call("exec", vessel_id=v, command="not a list")
                check(r.is_error, f"wrong type accepted: {r.content}")
            except Exception as e:  # the SDK raises the JSON-RPC error
                print(f"< protocol error {e}", flush=True)
            r = await good("exec", vessel_id=v, shell="echo still here")
            check(r["stdout"] == "still here\n", "the server survived bad input")

            await good("delete_vessel", vessel_id=v)
            listed = await good("list_vessels")
            check(listed["vessels"] == [], f"after delete: {listed}")
    print("session ok", flush=True)


asyncio.run(main())
