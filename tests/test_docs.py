"""The docs tell the truth about what is declared in code."""

from __future__ import annotations

import difflib
from pathlib import Path

from click.testing import CliRunner

from shared.contracts import subjects
from shared.contracts.events import EVENT_TYPES
from shared.infra.settings import declarations, settings_table
from ops.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]


def test_readme_lists_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    declared = [decl.env for _, decl in declarations()]
    assert declared, "no settings found"
    missing = [name for name in declared if f"`{name}`" not in readme]
    assert not missing, f"README.md configuration table lacks {missing}"


def test_readme_configuration_table_is_the_generated_one() -> None:
    """README's table is `nexus docs settings` verbatim: edit the declarations, then
    paste the command's output (the diff below says what drifted)."""
    readme = (ROOT / "README.md").read_text()
    generated = settings_table()
    header = generated.splitlines()[0]
    assert readme.count(header) == 1, "README.md has no single configuration table"
    start = readme.index(header)
    end = readme.find("\n\n", start)
    table = readme[start:end + 1 if end >= 0 else len(readme)]
    diff = "".join(difflib.unified_diff(table.splitlines(keepends=True),
                                        generated.splitlines(keepends=True),
                                        "README.md", "nexus docs settings"))
    assert table == generated, f"README.md's configuration table drifted:\n{diff}"


def test_docs_settings_command_prints_the_table() -> None:
    result = CliRunner().invoke(cli_main, ["docs", "settings"])
    assert result.exit_code == 0, result.output
    assert result.output == settings_table()


def test_architecture_lists_every_event_and_subject() -> None:
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    missing_events = [t.__name__ for t in EVENT_TYPES if f"`{t.__name__}`" not in doc]
    assert not missing_events, f"event catalogue lacks {missing_events}"
    declared = [v for k, v in vars(subjects).items() if k.isupper() and isinstance(v, str)
                and v.startswith(subjects.PREFIX + ".") and not k.endswith("_PREFIX")]
    missing_subjects = [s for s in declared if f"`{s}`" not in doc]
    assert not missing_subjects, f"subject map lacks {missing_subjects}"
    for stream in subjects.STREAMS:
        assert f"`{stream.name}`" in doc
