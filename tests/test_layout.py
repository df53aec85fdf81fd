"""The package's shape: no import cycles, and each extension point held to its contract."""

import inspect

import pytest


def test_the_package_has_no_import_cycles(benchmark_script):
    g = benchmark_script("import_graph", "tools")
    graph = g.import_graph()
    assert "embedft.training.loop" in graph and "embedft.modeling.encoder" in graph["embedft.training.loop"]
    assert g.cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle(benchmark_script):
    g = benchmark_script("import_graph", "tools")
    assert g.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("make", ["null", "mlflow"])
def test_every_tracker_implements_the_protocol(make, tmp_path):
    from embedft.tracking.base import NullTracker, Tracker
    from embedft.tracking.mlflow import MlflowTracker

    tracker = NullTracker() if make == "null" else MlflowTracker(f"sqlite:///{tmp_path}/m.db", "x", tmp_path / "spool")
    assert isinstance(tracker, Tracker)
    for name, proto in inspect.getmembers(Tracker, inspect.isfunction):
        if name.startswith("_"):
            continue
        got = inspect.signature(getattr(type(tracker), name))
        assert list(got.parameters) == list(inspect.signature(proto).parameters), name
    tracker.end("FINISHED")


def test_evaluators_are_the_tasks_config_accepts():
    from embedft.config import TASKS
    from embedft.evaluation.tasks import EVALUATORS

    assert set(EVALUATORS) == set(TASKS)


def test_losses_are_chosen_by_name_and_an_unknown_one_is_refused():
    from embedft.config import LossConfig
    from embedft.errors import ConfigError
    from embedft.training.losses import LOSSES, InfoNCELoss, build_loss

    assert LossConfig().name in LOSSES and isinstance(build_loss(LossConfig()), InfoNCELoss)
    with pytest.raises(ConfigError, match=r"loss.name='nope': unknown loss; use one of infonce"):
        build_loss(LossConfig(name="nope"))


def test_every_error_the_cli_prints_is_an_embedft_error():
    from embedft import errors

    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == errors.__name__]
    assert len(classes) >= 8 and all(issubclass(c, errors.EmbedftError) for c in classes)


def test_readers_are_the_formats_config_accepts():
    from embedft.config import FORMATS
    from embedft.data.readers import EXTENSIONS, READERS

    assert set(READERS) == set(FORMATS) and {name for _, name in EXTENSIONS} <= set(READERS)
