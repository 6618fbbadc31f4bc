"""The docs tell the truth about what is declared in code."""

from __future__ import annotations

import re
from pathlib import Path

from shared.contracts import subjects
from shared.contracts.events import EVENT_TYPES

ROOT = Path(__file__).resolve().parents[1]


def test_readme_lists_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    declared = re.findall(r'"""(\w+): ', (ROOT / "shared" / "infra" / "settings.py").read_text())
    assert declared, "no settings found"
    missing = [name for name in declared if f"`{name}`" not in readme]
    assert not missing, f"README.md configuration table lacks {missing}"


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
