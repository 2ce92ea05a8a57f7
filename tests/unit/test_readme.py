"""The README stays true: its settings table is the code's, its commands exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from services import cli
from services.commands.settings import BLOCK, table

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_settings_table_matches_code() -> None:
    match = BLOCK.search(README)
    assert match, "README lost its settings markers"
    assert match.group(0).split("\n", 1)[1].rsplit("\n", 1)[0] == table(), "run `synapse settings --update README.md`"


def test_make_targets_named_in_readme_exist() -> None:
    makefile = (ROOT / "Makefile").read_text()
    for target in set(re.findall(r"^make (\w[\w-]*)", README, re.MULTILINE)):
        assert re.search(rf"^{target}:", makefile, re.MULTILINE), f"Makefile has no target {target}"


def test_ci_runs_the_readme_test_command() -> None:
    assert "make test" in README
    assert "make test" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("command", cli.SUBCOMMANDS)
def test_every_subcommand_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    assert command in capsys.readouterr().out
    assert f"`synapse {command}" in README, f"README's command table misses synapse {command}"


def test_readme_links_stay_inside_the_repository_and_exist() -> None:
    for target in re.findall(r"\]\(([^)\s]+)\)", README):
        if target.startswith(("http://", "https://", "#")):
            continue
        path = (ROOT / target.split("#", 1)[0]).resolve()
        assert path.is_relative_to(ROOT), f"README links outside the repository: {target}"
        assert path.exists(), f"README links to a missing file: {target}"
