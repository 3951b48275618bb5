"""``--report DIR`` on ``aura chaos`` and ``aura demo``: a DIR that is a file is one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli.test_cli import run_aura


@pytest.mark.parametrize("command", [("chaos", "redis-restart"), ("demo",)])
def test_a_report_dir_that_is_a_file_is_refused_before_the_run(
    command: tuple[str, ...], tmp_path: Path
) -> None:
    file = tmp_path / "report.html"
    file.write_text("not a directory")
    done = run_aura(*command, "--report", str(file), cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"--report must be a directory; {file} is a file" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / ".aura").exists()  # refused before anything ran
