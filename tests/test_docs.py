"""Docs that are generated or that the CI reads: docs/config.md is current, the README states `make test`,
the bad-input table of docs/benchmarks.md names tests that exist.

Every experiment YAML's keys are checked by tests/test_config.py (test_every_experiment_loads_and_round_trips:
load_config refuses unknown keys), so that is not repeated here.
"""

import re

import pytest
from conftest import REPO


@pytest.fixture
def _config_docs(benchmark_script):
    return lambda: benchmark_script("config_docs", "tools")


def test_config_reference_is_current(_config_docs):
    text = _config_docs().render()
    current = (REPO / "docs" / "config.md").read_text(encoding="utf-8") if (REPO / "docs" / "config.md").is_file() else ""
    assert current == text, "docs/config.md is stale (embedft/config.py changed): run `make config-docs` and commit it"


def test_config_reference_names_every_field_with_its_comment(_config_docs):
    import dataclasses

    from embedft import config

    docs = _config_docs()
    text = docs.render()
    comments = docs.field_comments((REPO / "embedft" / "config.py").read_text(encoding="utf-8"))
    for section in dataclasses.fields(config.ExperimentConfig):
        cls = section.default_factory if dataclasses.is_dataclass(section.default_factory) else None
        if cls is None:
            continue
        assert f"## {section.name}\n" in text and cls.__doc__.split("\n")[0] in text
        for f in dataclasses.fields(cls):
            assert f"| `{section.name}.{f.name}` |" in text, f"{section.name}.{f.name}"
    # A comment above a field and one at its end are both kept, in that order.
    note = comments["ModelConfig"]["query_instruction"]
    assert note.startswith("Decoder embedders") and note.endswith("null = family default")
    assert f"| `train.lr` | `float` | `{config.TrainConfig.lr}` |" in text


def test_readme_states_the_test_command_ci_runs():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(r"^make test$", ci, re.M), ".ci/run no longer calls `make test`: update this test"
    assert re.search(r"\bmake test\b(?!-)", readme), "README.md must state the test command CI runs: make test"


def test_docs_links_resolve():
    # Relative links between the docs (README.md, docs/*.md) point at files that exist, except the
    # pages other changes add (listed in the README's "More").
    coming = {"docs/serving.md", "docs/mlflow-ui.md"}
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if "://" in target:
                continue
            path = (page.parent / target).resolve()
            assert path.exists() or str(path.relative_to(REPO)) in coming, f"{page.name}: broken link {target}"


def _faults_section() -> str:
    text = (REPO / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    start = text.index("## Faults and bad input")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def test_every_test_the_bad_input_table_names_exists_and_every_fault_test_is_named():
    # The table of docs/benchmarks.md cannot go stale: a renamed or deleted test fails here, and so does a
    # fault test (tests/faults) the table does not list.
    section = _faults_section()
    named = set(re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", section))
    assert len(named) >= 40, "the bad-input table lost its test names"
    for path, name in sorted(named):
        source = REPO / path
        assert source.is_file(), f"docs/benchmarks.md names {path}, which does not exist"
        assert re.search(rf"^def {name}\(", source.read_text(encoding="utf-8"), re.M), \
            f"docs/benchmarks.md names {path}::{name}, which is not a test there"
    for source in sorted((REPO / "tests" / "faults").glob("test_*.py")):
        for name in re.findall(r"^def (test_\w+)\(", source.read_text(encoding="utf-8"), re.M):
            path = source.relative_to(REPO).as_posix()
            assert (path, name) in named, f"{path}::{name} is not in the bad-input table of docs/benchmarks.md"
    table = section[section.index("### Bad-input table"):]
    rows = [ln for ln in table.splitlines() if ln.startswith("| ") and not ln.startswith("| **")][1:]  # no header
    for row in rows:  # a `|` inside a cell would split it
        cells = [c.strip() for c in row.strip().strip("|").split(" | ")]
        assert len(cells) == 4 and "::" in cells[3], f"bad-input table row without 4 cells and a test: {row[:80]}"
