"""Settings are validated at construction, from flags, environment and code alike (fast tier)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cifar_serve.server.settings import Settings, SettingsError, settings_from_args

pytestmark = pytest.mark.fast


def test_environment_values_are_held_to_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        settings_from_args([], environ={"CIFAR_SERVE_PRECISION": "int4"})
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert "--precision" in err and "CIFAR_SERVE_PRECISION" in err and "int4" in err and "fp32" in err


def test_contradictory_limits_are_refused_naming_both() -> None:
    with pytest.raises(
        SettingsError, match=r"--max-images-per-request \(5000\).*--max-queue-images \(4096\)"
    ):
        Settings(max_images_per_request=5000)
    with pytest.raises(SettingsError, match=r"--max-queue-images.*--max-batch-size"):
        Settings(max_batch_size=128, max_queue_images=64, max_images_per_request=64)
    with pytest.raises(SettingsError, match=r"--max-inflight-request-bytes.*--max-receive-message-bytes"):
        Settings(max_inflight_request_bytes=1024)
    with pytest.raises(SettingsError, match="--log-level"):
        Settings(log_level="LOUD")
    with pytest.raises(SettingsError, match="--workers must be between 1 and 64, got 0"):
        Settings(workers=0)


def test_flags_beat_environment_beat_defaults() -> None:
    s = settings_from_args(
        ["--max-batch-size", "32"], environ={"CIFAR_SERVE_MAX_BATCH_SIZE": "16", "CIFAR_SERVE_PORT": "6000"}
    )
    assert (s.max_batch_size, s.port, s.host) == (32, 6000, "127.0.0.1")


def test_cifar_serve_with_a_bad_environment_exits_at_once_with_one_line() -> None:
    env = {**os.environ, "CIFAR_SERVE_PRECISION": "int4"}
    proc = subprocess.run(
        [sys.executable, "-m", "cifar_serve.server"], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "CIFAR_SERVE_PRECISION" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_grpc_experiments_reach_grpc_core_unless_the_operator_set_them(tmp_path: Path) -> None:
    # gRPC core reads GRPC_EXPERIMENTS once, when grpc is imported, and names each experiment it
    # does not know: an unknown name in its complaint shows whose value got there.
    base = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}

    def start(*flags: str, **env: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "cifar_serve.server", "--model-dir", str(tmp_path / "none"), *flags]
        return subprocess.run(argv, env={**base, **env}, capture_output=True, text=True, timeout=120)

    # Each start ends early (no model here, and no torch where the fast tier runs alone): gRPC
    # has read the variable by then.
    ours = start("--grpc-experiments", "cifar_serve_flag_check")
    assert ours.returncode != 0 and "Unknown experiment: cifar_serve_flag_check" in ours.stderr, ours.stderr
    from_env = start(CIFAR_SERVE_GRPC_EXPERIMENTS="cifar_serve_env_check")
    assert "Unknown experiment: cifar_serve_env_check" in from_env.stderr, from_env.stderr
    theirs = start("--grpc-experiments", "cifar_serve_flag_check", GRPC_EXPERIMENTS="operator_check")
    assert "Unknown experiment: operator_check" in theirs.stderr, theirs.stderr
    assert "cifar_serve_flag_check" not in theirs.stderr
    documented = start("--grpc-experiments", "-event_engine_listener")  # the one README names
    assert documented.returncode != 0 and "Unknown experiment" not in documented.stderr, documented.stderr


def test_restart_limits_come_from_flags_and_environment_and_are_checked() -> None:
    s = settings_from_args(
        ["--max-restarts", "2"],
        environ={"CIFAR_SERVE_RESTART_WINDOW_S": "30", "CIFAR_SERVE_MAX_RESTARTS": "9"},
    )
    assert (s.max_restarts, s.restart_window_s) == (2, 30.0)
    assert (Settings().max_restarts, Settings().restart_window_s) == (5, 60.0)
    assert Settings(max_restarts=0).max_restarts == 0  # never restart: the first death ends the server
    with pytest.raises(SettingsError, match="--max-restarts must not be negative, got -1"):
        Settings(max_restarts=-1)
    with pytest.raises(SettingsError, match="--restart-window-s must be positive, got 0"):
        Settings(restart_window_s=0)


def test_a_bad_boolean_is_one_line_saying_what_works(capsys: pytest.CaptureFixture[str]) -> None:
    from cifar_serve.server.settings import settings_from_args

    for argv, env in ((["--idle-dispatch", "maybe"], {}), ([], {"CIFAR_SERVE_SPIN_WAIT": "perhaps"})):
        with pytest.raises(SystemExit) as info:
            settings_from_args(argv, env)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err
        assert "not a boolean" in err and "use true or false" in err and "usage:" not in err


def test_help_groups_every_option_once() -> None:
    from dataclasses import fields

    from cifar_serve.server.settings import Settings, build_parser

    text = build_parser({}).format_help()
    titles = ["network:", "model:", "batching:", "limits:", "security:", "workers:", "logging and process:"]
    positions = [text.index(f"\n{t}\n") for t in titles]
    assert positions == sorted(positions), text
    assert "\nother:\n" not in text  # every option has its group
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        assert len(re.findall(rf"^  {re.escape(flag)} ", text, re.M)) == 1, flag
    assert text.index("--port ") < text.index("\nmodel:\n") < text.index("--model-dir ")


def test_event_loop_uvloop_where_installed_else_refused_or_asyncio(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from cifar_serve.server import loops

    def names(kind: str) -> str:
        loop = loops.new_event_loop(kind)
        try:
            return loop.run_until_complete(_name())
        finally:
            loop.close()

    async def _name() -> str:
        return loops.running_loop_name()

    assert names("auto") == "uvloop" and names("uvloop") == "uvloop" and names("asyncio") == "asyncio"
    assert loops.run(_name(), "auto") == "uvloop" and loops.run(_name(), "asyncio") == "asyncio"
    assert Settings(event_loop="uvloop").event_loop == "uvloop"

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "uvloop" else real(name, *a)
    )
    with pytest.raises(SettingsError, match=r"--event-loop is 'uvloop'.*not installed"):
        Settings(event_loop="uvloop")
    assert names("auto") == "asyncio"
