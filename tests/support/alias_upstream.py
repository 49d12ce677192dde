"""A FastMCP upstream whose tool ``delete_app`` is also callable under a name it never
lists: FastMCP resolves the hashed alias ``__<12 hex>_delete_app`` of an app tool to
``delete_app`` (fastmcp/server/providers/addressing.py). ``list_apps`` says it is read-only;
``delete_app`` states no annotations.

Run: ``python tests/support/alias_upstream.py PORT``; ``ALIAS`` is the alias to call.
"""

from __future__ import annotations

import sys

from fastmcp import FastMCP
from fastmcp.apps.app import FastMCPApp
from fastmcp.server.providers.addressing import hashed_backend_name

ALIAS = hashed_backend_name("ops", "delete_app")

app = FastMCPApp("ops")


@app.tool(model=True)
def delete_app(name: str) -> str:
    """Delete an application (here: only says so)."""
    return f"deleted {name}"


server = FastMCP("alias-upstream")


@server.tool(annotations={"readOnlyHint": True, "openWorldHint": False})
def list_apps(name: str = "") -> str:
    """The applications there are (``name``: ignored; every test call sends one)."""
    return "billing,search"


server.add_provider(app)

if __name__ == "__main__":
    server.run(transport="http", host="127.0.0.1", port=int(sys.argv[1]), show_banner=False)
