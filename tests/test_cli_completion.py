"""Shell completion, as the README documents it: click's, through `_AMQTASK_COMPLETE`."""

from __future__ import annotations

import os
import subprocess
import sys


def complete(words: str, cword: int) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-m", "amqtask"],
        env={
            **os.environ,
            "_AMQTASK_COMPLETE": "bash_complete",
            "COMP_WORDS": words,
            "COMP_CWORD": str(cword),
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_commands_and_options_complete() -> None:
    assert complete("amqtask wor", 1) == ["plain,worker", "plain,workers"]
    assert "plain,--reload" in complete("amqtask worker app:app --re", 3)
    assert complete("amqtask pur", 1) == ["plain,purge"]


def test_the_bash_script_the_readme_sources_is_printed() -> None:
    script = subprocess.run(
        [sys.executable, "-m", "amqtask"],
        env={**os.environ, "_AMQTASK_COMPLETE": "bash_source"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    ).stdout

    assert "complete -o nosort -F _amqtask_completion amqtask" in script
