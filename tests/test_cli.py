"""The CLI through its real entry point (a subprocess running the installed ``dmoe`` script)."""

import os
import shutil
import subprocess
import sys

import pytest

DMOE = shutil.which("dmoe") or ""


def run(*args, env=None):
    cmd = [DMOE, *args] if DMOE else [sys.executable, "-m", "dmoe.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_help_lists_commands_with_examples():
    out = run("--help")
    assert out.returncode == 0
    for command in ("ask", "bench", "router"):
        assert command in out.stdout
    ask = run("ask", "--help")
    assert ask.returncode == 0 and "example" in ask.stdout and "--model" in ask.stdout


def test_user_errors_are_one_line_without_traceback(tmp_path):
    out = run("ask", "hello?", "--model", str(tmp_path / "missing-model"))
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().startswith("dmoe: error: model") and "tried" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    debug = run("--debug", "ask", "hello?", "--model", str(tmp_path / "missing-model"))
    assert "Traceback" in debug.stderr


@pytest.mark.slow
def test_ask_answers_with_the_packaged_model():
    out = run("ask", "What is the capital of France?", "--max-new-tokens", "16")
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
