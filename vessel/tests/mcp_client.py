"""What the MCP client sessions of the tests share: a failing check ends the
session; `calls(session)` gives `call` (prints a transcript line, returns
the result) and `good` (a call that must succeed; returns its structured
content)."""

import json
import sys


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", flush=True)
        sys.exit(1)


def calls(s):
    async def call(name, **arguments):
        r = await s.call_tool(name, arguments)
        text = r.content[0].text if r.content else ""
        print(f"> {name} {json.dumps(arguments)[:120]}\n< {'ERROR ' if r.is_error else ''}{text[:200]}", flush=True)
        return r

    async def good(name, **arguments):
        r = await call(name, **arguments)
        check(not r.is_error, f"{name} failed: {r.content}")
        return r.structured_content

    return call, good
