"""The README stays true: its two set-up commands, CI running the test command, and its API example running."""

import re
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, flags=re.S | re.M)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def _setup_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", _section("Set up"), flags=re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_setup_has_exactly_two_commands_main_job_then_tests():
    commands = _setup_commands()
    assert len(commands) == 2
    main_job, tests = commands
    assert main_job.endswith("python examples/quickstart.py")
    assert tests.endswith("python -m pytest")
    for command in commands:  # each works on a fresh machine: venv, the CPU torch wheel first, then the package
        assert command.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && ")


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (ROOT / ".ci" / "run").read_text()
    assert _setup_commands()[1] in ci.splitlines()


def test_the_usage_example_runs(tmp_path):
    code = re.search(r"```python\n(.*?)```", _section("Usage"), flags=re.S).group(1)
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "digits_index" / "dmin_index.json").exists()
    assert "[" in result.stdout  # the printed sample ids and scores
