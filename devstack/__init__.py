"""Real processes and shared inputs for the development tools of this repository.

The local stack (``make run``), the benchmark (``bench/``), the fuzzer (``fuzz/``) and the
tests all start redis-server, Envoy, mcp-authz and the demo MCP upstream on loopback the
same way, and the fuzzer and the tests hold the decision path to the same oracle and
corpus: this package is where those live, so none of the tools imports the test suite.
It is not part of the installed product.
"""
