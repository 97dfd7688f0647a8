"""Model aliases (MLflow's: `champion` names one version of a model): set by `expkit models
alias` or by the job's `model.aliases`, accepted as `NAME@ALIAS` wherever a model is named,
and mirrored to each model registry that registered the version (`ModelRegistry.set_alias`),
here a registry plugin installed for the test that keeps its versions in one JSON file."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from conftest import error_line
from expkit import Model
from expkit.errors import UserError

TRAIN = """
import os, sys
from expkit import Run
acc = float(sys.argv[1])
Run.get_context().log("acc", acc)
os.makedirs("outputs", exist_ok=True)
open("outputs/model.pt", "w").write(f"weights {acc}")
"""

# A model registry in one JSON file ($SHELF_FILE): its entries count from 1 whatever the
# versions are, so a registration's locator is what finds an entry again. $SHELF_REFUSE
# makes it refuse aliases, as a service that is down would.
SHELF = """
import json, os
from expkit.plugin import ModelRegistry, Registration, UserError, hookimpl


def load():
    path = os.environ["SHELF_FILE"]
    if not os.path.exists(path):
        return {"entries": {}, "aliases": {}}
    with open(path) as f:
        return json.load(f)


def save(state):
    with open(os.environ["SHELF_FILE"], "w") as f:
        json.dump(state, f)


class Shelf(ModelRegistry):
    name = "shelf"
    description = "model versions on a shelf (one JSON file)"

    def register(self, model, run, options):
        state = load()
        entry = str(len(state["entries"]) + 101)
        state["entries"][entry] = f"{model.name}:{model.version}"
        save(state)
        return Registration(f"{model.name} entry {entry} on the shelf", {"entry": entry})

    def set_alias(self, alias, model, registration):
        if os.environ.get("SHELF_REFUSE"):
            raise UserError("the shelf is locked")
        state = load()
        state["aliases"][alias] = registration.locator["entry"]
        save(state)
        return f"entry {registration.locator['entry']} is @{alias}"

    def delete_alias(self, alias, model_name, registration):
        if os.environ.get("SHELF_REFUSE"):
            raise UserError("the shelf is locked")
        state = load()
        state["aliases"].pop(alias, None)
        save(state)
        return f"@{alias} taken off entry {registration.locator['entry']}"


@hookimpl
def expkit_model_registries():
    return [Shelf()]
"""


@pytest.fixture
def shelf(site, tmp_path, monkeypatch):
    """The shelf registry installed for the command; reads back its JSON file."""
    site.install("expkit-shelf", {"shelf": SHELF})
    path = tmp_path / "shelf.json"
    monkeypatch.setenv("SHELF_FILE", str(path))
    monkeypatch.delenv("SHELF_REFUSE", raising=False)
    monkeypatch.setenv("PYTHONPATH", site.env["PYTHONPATH"])
    return lambda: json.loads(path.read_text())


def train(write_job, expkit_cli, value: float, **model) -> str:
    """Run a job registering `digits` (with `model`'s fields) on `value`; its stdout."""
    spec = {"name": "digits", "path": "outputs/model.pt", **model}
    job = write_job({"model": spec, "args": [value]}, script=TRAIN)
    result = expkit_cli("run", str(job))
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def aliases_in_list(expkit_cli) -> dict[str, str]:
    """`expkit models list`: version -> its aliases cell."""
    lines = expkit_cli("models", "list").stdout.splitlines()
    start = lines[0].index("ALIASES")
    return {line.split()[1]: line[start:].strip() for line in lines[1:]}


def test_an_alias_names_a_version_everywhere_and_moves(write_job, expkit_cli, tmp_path):
    for value in (0.5, 0.7):
        train(write_job, expkit_cli, value)

    done = expkit_cli("models", "alias", "digits:1", "champion")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "digits@champion -> version 1\n"
    assert aliases_in_list(expkit_cli) == {"1": "@champion", "2": ""}
    shown = expkit_cli("models", "show", "digits@champion").stdout
    assert shown.splitlines()[1:4] == [
        "version     1",
        shown.splitlines()[2],
        "aliases     @champion",
    ]
    assert shown.splitlines()[2].startswith("registered  ") and "by run test_1" in shown
    copied = expkit_cli("models", "download", "digits@champion", str(tmp_path / "out"))
    assert copied.returncode == 0, copied.stderr
    assert (tmp_path / "out" / "model.pt").read_text() == "weights 0.5"

    moved = expkit_cli("models", "alias", "digits", "champion")  # the latest version
    assert moved.stdout == "digits@champion -> version 2 (was version 1)\n"
    copy = expkit_cli("models", "alias", "digits@champion", "previous")
    assert copy.stdout == "digits@previous -> version 2\n"
    assert aliases_in_list(expkit_cli) == {"1": "", "2": "@champion @previous"}

    gone = expkit_cli("models", "alias", "digits", "previous", "--delete")
    assert gone.stdout == "digits@previous removed (it pointed at version 2)\n"
    missing = expkit_cli("models", "show", "digits@previous")
    assert error_line(missing) == (
        "expkit: error: model 'digits' has no alias 'previous' (its aliases: @champion)"
    )


def test_the_python_api_takes_references(expkit_workspace, write_job, expkit_cli):
    for value in (0.5, 0.7):
        train(write_job, expkit_cli, value)
    expkit_cli("models", "alias", "digits:1", "champion")

    assert Model(expkit_workspace, "digits@champion").version == 1
    assert Model(expkit_workspace, "digits:2").version == 2
    assert Model(expkit_workspace, "digits").version == 2
    assert Model(expkit_workspace, "digits", 1).aliases == ["champion"]
    with pytest.raises(UserError, match="model 'digits' has no alias 'nope'"):
        Model(expkit_workspace, "digits@nope")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["alias", "digits:1", "latest"],
            "alias 'latest' is reserved by MLflow (the latest version); choose another, "
            "e.g. champion",
        ),
        (
            ["alias", "digits:1", "V12"],
            "alias 'V12' is reserved by MLflow (a version); choose another, e.g. champion",
        ),
        (
            ["alias", "digits:1", "best.one"],
            "alias 'best.one': an alias uses letters, digits, '_' and '-' (at most 255), and "
            "is not `latest` nor v<digits>, which MLflow reserves; e.g. champion",
        ),
        (
            ["show", "digits@"],
            "'digits@': alias '': an alias uses letters, digits, '_' and '-' (at most 255), "
            "and is not `latest` nor v<digits>, which MLflow reserves; e.g. champion",
        ),
        (
            ["show", "digits:1@champion"],
            "'digits:1@champion': give a version or an alias, not both (e.g. digits:2 or "
            "digits@champion)",
        ),
        (
            ["alias", "digits:1", "champion", "--delete"],
            "'digits:1': with --delete give the model's name only, e.g. `expkit models alias "
            "digits champion --delete`",
        ),
        (
            ["alias", "digits", "nope", "--delete"],
            "model 'digits' has no alias 'nope'; nothing to delete",
        ),
        (
            ["download", "digits@nope", "out"],
            "model 'digits' has no alias 'nope' (it has none; set one with `expkit models "
            "alias digits:VERSION nope`)",
        ),
        (["alias", "other@champion", "x"], "no model 'other' in this workspace (models: digits)"),
        (
            ["alias", "digits:1", "@champion"],
            "alias '@champion': write it without the '@' (champion)",
        ),
    ],
    ids=[
        "latest",
        "version",
        "dot",
        "empty",
        "both",
        "delete-version",
        "delete-none",
        "no-alias",
        "no-model",
        "at-sign",
    ],
)
def test_a_bad_alias_or_reference_is_one_line(write_job, expkit_cli, args, message):
    train(write_job, expkit_cli, 0.5)

    result = expkit_cli("models", *args)

    assert result.returncode == 2, result.stdout + result.stderr
    assert error_line(result) == f"expkit: error: {message}"


def test_export_takes_an_alias(write_job, expkit_cli):
    train(write_job, expkit_cli, 0.5)
    result = expkit_cli("export", "digits@champion", "--format", "onnx")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "model 'digits' has no alias 'champion'" in error_line(result)


# -- mirrored to the registries that have the version ----------------------------------------
def test_the_jobs_aliases_are_mirrored_to_its_registry(shelf, write_job, expkit_cli):
    out = train(write_job, expkit_cli, 0.5, registries=["shelf"], aliases=["champion"])

    assert "model registry 'shelf': digits entry 101 on the shelf" in out
    assert "model registry 'shelf': entry 101 is @champion" in out
    assert shelf() == {"entries": {"101": "digits:1"}, "aliases": {"champion": "101"}}
    shown = expkit_cli("models", "show", "digits@champion").stdout
    registered = shown.split("registered in\n", 1)[1].splitlines()
    assert registered[0].split("  (")[0].split() == [
        "shelf",
        "digits",
        "entry",
        "101",
        "on",
        "the",
        "shelf",
    ]
    assert time.strftime("%Y-%m-%d") in registered[0]

    # `models alias` finds the version on the shelf by its registration's locator.
    train(write_job, expkit_cli, 0.7, registries=["shelf"])  # entry 102
    moved = expkit_cli("models", "alias", "digits:2", "champion")
    assert moved.stdout.splitlines() == [
        "digits@champion -> version 2 (was version 1)",
        "model registry 'shelf': entry 102 is @champion",
    ]
    assert shelf()["aliases"] == {"champion": "102"}
    gone = expkit_cli("models", "alias", "digits", "champion", "--delete")
    assert gone.stdout.splitlines()[1] == "model registry 'shelf': @champion taken off entry 102"
    assert shelf()["aliases"] == {}


def test_an_alias_moved_to_a_version_the_registry_lacks_is_taken_off_there(
    shelf, write_job, expkit_cli
):
    train(write_job, expkit_cli, 0.5, registries=["shelf"], aliases=["champion"])
    train(write_job, expkit_cli, 0.7)  # version 2: in the workspace only

    moved = expkit_cli("models", "alias", "digits:2", "champion")

    assert moved.stdout.splitlines()[1] == "model registry 'shelf': @champion taken off entry 101"
    assert shelf()["aliases"] == {}  # never left pointing at another version there


def test_a_registry_refusing_an_alias_is_a_warning_and_the_version_is_kept(
    shelf, write_job, expkit_cli, monkeypatch
):
    monkeypatch.setenv("SHELF_REFUSE", "1")

    out = train(write_job, expkit_cli, 0.5, registries=["shelf"], aliases=["champion"])

    assert "model registry 'shelf': alias 'champion' not set there: the shelf is locked" in out
    assert aliases_in_list(expkit_cli) == {"1": "@champion"}
    assert shelf()["entries"] == {"101": "digits:1"} and shelf()["aliases"] == {}
    by_hand = expkit_cli("models", "alias", "digits:1", "best")
    assert by_hand.returncode == 0
    assert by_hand.stderr == (
        "warning: model registry 'shelf': alias 'best' not set there: the shelf is locked\n"
    )


# -- a version withdrawn with its run gives the alias back ------------------------------------
def test_an_alias_of_a_withdrawn_version_points_where_it_did_before(expkit_workspace):
    """A run that fails after its register stage keeps no version (history.models.VISIBLE):
    the alias its register stage moved points at the version it had before."""
    history = expkit_workspace.history
    source = Path(expkit_workspace.path).parent / "model"
    source.mkdir()
    (source / "model.pt").write_text("w")
    from expkit.registry import ModelStore

    store = ModelStore(expkit_workspace)
    store.register_path("digits", source)
    history.aliases.set("digits", "champion", 1)
    record = history.runs.create("test", {"entry_script": "train.py"})
    store.register_path("digits", source, run_id=record.id)
    history.aliases.set("digits", "champion", 2, record.id)
    assert history.aliases.of_model("digits") == {"champion": 2}

    history.runs.finish(record.id, "failed", "a required sink failed")

    assert history.aliases.of_model("digits") == {"champion": 1}
    assert store.resolve("digits@champion").version == 1


def test_each_models_action_describes_its_arguments_with_an_example(expkit_cli):
    for action, argument in [("list", "NAME"), ("show", "REF"), ("alias", "ALIAS"),
                             ("download", "DEST")]:  # fmt: skip
        shown = expkit_cli("models", action, "--help")
        assert shown.returncode == 0, shown.stderr
        usage, description, *rest = shown.stdout.split("\n\n")
        assert argument in usage and len(description.split()) > 10, shown.stdout
        examples = rest[-1]
        assert examples.startswith("example") and f"expkit models {action} " in examples
