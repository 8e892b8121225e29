"""Running a command's ``main`` in-process and checking its one-line errors (shared by CLI tests)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest


def run_cli(
    main: Callable[[list[str]], object], argv: Sequence[str], capsys: pytest.CaptureFixture[str]
) -> tuple[int, str, str]:
    """Run ``main(argv)``; return ``(exit code, stdout, stderr)``."""
    capsys.readouterr()
    try:
        main(list(argv))
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *fragments: str) -> str:
    """Exit code 2, exactly one stderr line starting ``error:`` that holds every fragment."""
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error:"), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]
