"""mcp-authz: a policy-enforcing Envoy ext_authz service for MCP servers."""
