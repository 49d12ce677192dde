"""``mcp-authz serve``'s settings: one value from flags, ``MCP_AUTHZ_*`` variables and one
set of defaults."""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import pytest

from authz import cli
from authz.settings import Settings, SettingsError, from_arguments


def settings(argv: list[str], environ: dict[str, str] | None = None) -> Settings:
    args = cli._parser().parse_args(["serve", *argv])
    return from_arguments(vars(args), environ or {})


def test_defaults_are_the_dataclass_defaults() -> None:
    built = settings(["--policy", "p.json", "--store", "memory"])
    assert built == Settings(policy_path="p.json", store_url="memory://")
    assert built.store_timeout_s == 0.05
    assert built.grpc_address == "127.0.0.1:9001" and built.http_address == "127.0.0.1:9002"
    assert not built.reuse_port and not built.fail_open and not built.admin_tokens


def test_a_flag_wins_over_its_variable_which_wins_over_the_default() -> None:
    environ = {
        "MCP_AUTHZ_POLICY": "env.yaml",
        "MCP_AUTHZ_REDIS": "redis://127.0.0.1:6380",
        "MCP_AUTHZ_GRPC": "127.0.0.1:7001",
        "MCP_AUTHZ_STORE_TIMEOUT_MS": "80",
        "MCP_AUTHZ_FAIL_OPEN": "true",
        "MCP_AUTHZ_WORKERS": "3",
        "MCP_AUTHZ_RELOAD_INTERVAL": "2.5",
    }
    built = settings(["--grpc", "127.0.0.1:7002"], environ)
    assert built.policy_path == "env.yaml"
    assert built.store_url == "redis://127.0.0.1:6380"
    assert built.grpc_address == "127.0.0.1:7002"
    assert built.store_timeout_s == pytest.approx(0.08)
    assert built.fail_open
    assert built.workers == 3 and built.reuse_port
    assert built.reload_interval_s == 2.5
    assert built.http_address == "127.0.0.1:9002"


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        ([], {}, "--policy (or MCP_AUTHZ_POLICY) is required"),
        (["--policy", "p"], {}, "a counter store is required"),
        (["--policy", "p", "--store", "memory", "--redis", "redis://x"], {}, "not both"),
        (["--policy", "p", "--store", "memory", "--workers", "2"], {}, "--workers must be 1"),
        (["--policy", "p", "--store", "memory"], {"MCP_AUTHZ_WORKERS": "two"}, "MCP_AUTHZ_WORKERS"),
        (["--policy", "p", "--store", "memory"], {"MCP_AUTHZ_LOG_FORMAT": "xml"}, "json, text"),
        (["--policy", "p", "--store", "memory", "--store-timeout-ms", "0"], {}, "positive"),
        (["--policy", "p", "--store", "memory", "--grpc-tls-key", "k"], {}, "go together"),
    ],
)
def test_unusable_settings_are_refused_with_the_reason(
    argv: list[str], environ: dict[str, str], message: str
) -> None:
    with pytest.raises(SettingsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        settings(argv, environ)


def test_admin_tokens_come_from_a_file_or_the_variable(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("alice:0123456789abcdef0123\n")
    from_file = settings(["--policy", "p", "--store", "memory", "--admin-tokens-file", str(tokens)])
    assert from_file.admin_tokens == {"0123456789abcdef0123": "alice"}
    from_env = settings(
        ["--policy", "p", "--store", "memory"],
        {"MCP_AUTHZ_ADMIN_TOKENS": "bob:fedcba9876543210fedc"},
    )
    assert from_env.admin_tokens == {"fedcba9876543210fedc": "bob"}


def test_workers_receive_the_same_value() -> None:
    """Each worker process gets the settings pickled, with nothing hidden beside them."""
    built = settings(["--policy", "p", "--redis", "redis://127.0.0.1:6379", "--workers", "4"])
    assert pickle.loads(pickle.dumps(built)) == built  # noqa: S301 (our own bytes)
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.workers = 1  # type: ignore[misc]


def test_policy_help_says_json_or_yaml(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli._parser().parse_args(["serve", "--help"])
    assert "policy file (JSON or YAML)" in capsys.readouterr().out
