"""Metric row groups (`expkit.history.metric_groups`): the pump stores each series' numbers of
a batch in one row, and every reader gives them back value by value, exactly as logged.

A burst of several names and ranks, with and without steps, text values in between, and an
attempt that resumed from a checkpoint, written by real script processes through `run.log()`
and stored by the pump: far fewer rows than values, every float bit for bit (-0.0, inf,
subnormals, 1e308), each value once and in its series' order through `of` (also page by page
across groups), `current`, `latest`, `count`, `span`, `expkit metrics`, a metric sink, and the
sweeps' table.
"""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import bare_env
from expkit.context import ATTEMPT_ENV, CHANNEL_ENV, RUN_ID_ENV
from expkit.history.metric_groups import MetricRow, groups
from expkit.history.metrics import REFUSED
from expkit.metrics import MetricPump

# The floats a group must keep bit for bit: a REAL column keeps no sign of -0.0.
SPECIAL = [-0.0, 0.0, math.inf, -math.inf, 5e-324, 2.2250738585072014e-308, 1e308, -1e308, 0.1]

BURST = """
import math, sys
from expkit import Run
SPECIAL = [-0.0, 0.0, math.inf, -math.inf, 5e-324, 2.2250738585072014e-308, 1e308, -1e308, 0.1]
run = Run.get_context()
count, base = int(sys.argv[1]), int(sys.argv[2])
for i in range(count):
    step = base + i
    run.log("loss", SPECIAL[i % len(SPECIAL)] if i % 7 == 0 else step / 3, step=step)
    run.log("lr", 1.0 / (step + 1))  # no step
    if i % 500 == 250:
        run.log("loss", f"checkpoint {step}")  # text in the middle of a series
        run.log("note", {"at": step})
    if i % 3 == 0:
        run.log("grad_norm", float(step), step=step)
run.flush()
"""


def bits(value: object) -> object:
    """A value as what tells every float apart (-0.0 from 0.0, each NaN payload)."""
    return struct.pack("<d", value) if isinstance(value, float) else value


def expected(count: int, base: int, attempt: int, rank: int) -> list[tuple]:
    """What BURST logs: (name, step, value, attempt, rank) in the order logged."""
    found: list[tuple] = []
    for i in range(count):
        step = base + i
        found.append(
            ("loss", step, SPECIAL[i % len(SPECIAL)] if i % 7 == 0 else step / 3, attempt, rank)
        )
        found.append(("lr", None, 1.0 / (step + 1), attempt, rank))
        if i % 500 == 250:
            found.append(("loss", None, f"checkpoint {step}", attempt, rank))
            found.append(("note", None, {"at": step}, attempt, rank))
        if i % 3 == 0:
            found.append(("grad_norm", step, float(step), attempt, rank))
    return found


def script(tmp_path: Path, channel: Path, count: int, base: int, attempt: int, rank: int) -> None:
    """BURST run by a real process as `rank` of `attempt`, writing into `channel`."""
    path = tmp_path / "burst.py"
    path.write_text(textwrap.dedent(BURST))
    env = bare_env(
        **{CHANNEL_ENV: str(channel), RUN_ID_ENV: "run_1", ATTEMPT_ENV: str(attempt)},
        RANK=str(rank),
    )
    done = subprocess.run(
        [sys.executable, str(path), str(count), str(base)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr


def series(rows: list, key=lambda r: (r["name"], r["rank"])) -> dict[tuple, list[tuple]]:
    """Rows by series, each value as (step, bits of the value, attempt)."""
    from expkit.history import metric_value

    found: dict[tuple, list[tuple]] = {}
    for r in rows:
        found.setdefault(key(r), []).append((r["step"], bits(metric_value(r)), r["attempt"]))
    return found


def logged_series(values: list[tuple]) -> dict[tuple, list[tuple]]:
    found: dict[tuple, list[tuple]] = {}
    for name, step, value, attempt, rank in values:
        found.setdefault((name, rank), []).append((step, bits(value), attempt))
    return found


@pytest.fixture
def burst(expkit_workspace, tmp_path):
    """Two ranks of attempt 1 logging 3,000 steps each (steps 0..2999), then attempt 2 of rank
    0 resuming from step 2000 (steps 2000..2999 again), stored by the pump: (history, what
    was logged in order per process)."""
    channel = tmp_path / "metrics"
    channel.mkdir()
    history = expkit_workspace.history
    logged = []
    for attempt, rank, base in ((1, 0, 0), (1, 1, 0), (2, 0, 2000)):
        count = 3000 if attempt == 1 else 1000
        script(tmp_path, channel, count, base, attempt, rank)
        logged += expected(count, base, attempt, rank)
    pump = MetricPump(history, "run_1", channel)
    assert pump.pump() == len(logged)
    return history, logged


def test_a_burst_is_stored_as_groups_and_every_value_read_back_exactly(burst):
    history, logged = burst
    rows = history.metrics.of("run_1")

    assert series(rows) == logged_series(logged)
    assert len(rows) == len(logged) == history.metrics.count("run_1")
    ids = [r["id"] for r in rows]
    assert ids == sorted(set(ids)) and history.metrics.span("run_1") == (ids[0], ids[-1])
    assert history.metrics.count("run_1", "grad_norm") == 2 * 1000 + 334
    stored = history.db.execute("SELECT COUNT(*) FROM metrics WHERE run_id = 'run_1'").fetchone()
    assert stored[0] < len(logged) / 50  # a row per series and batch, not per value
    assert all(isinstance(r, MetricRow) and r["run_id"] == "run_1" for r in rows)
    assert rows[0].keys() == (
        "id",
        "run_id",
        "name",
        "step",
        "value",
        "payload",
        "ts",
        "rank",
        "attempt",
    )
    assert dict(zip(rows[0].keys(), rows[0], strict=True))["name"] == rows[0]["name"]

    by_name = {name: history.metrics.of("run_1", name) for name in history.metrics.names("run_1")}
    assert sorted(by_name) == ["grad_norm", "loss", "lr", "note"]
    for name, found in by_name.items():
        assert found == [r for r in rows if r["name"] == name]
    last = {name: found[-1] for name, found in by_name.items()}
    assert history.metrics.latest("run_1") == {
        "loss": pytest.approx(2999 / 3),
        "lr": 1 / 3000,
        "grad_norm": 2999.0,
        "note": {"at": 2750},
    }
    assert history.metrics.last_of(["run_1", "other"], "grad_norm") == {"run_1": 2999.0}
    assert last["lr"]["attempt"] == 2 and last["lr"]["rank"] == 0


def test_pages_count_values_across_group_boundaries(burst):
    history, _ = burst
    every = history.metrics.of("run_1")
    for name, size in ((None, 997), (None, 1), ("loss", 313), ("note", 2)):
        pages, after = [], 0
        while page := history.metrics.of("run_1", name, after_id=after, limit=size):
            assert len(page) <= size
            pages += page
            after = page[-1]["id"]
        assert pages == [r for r in every if name in (None, r["name"])]
    # A page may start inside a group: the values past `after_id` only.
    middle = every[len(every) // 2]["id"]
    assert history.metrics.of("run_1", after_id=middle) == [r for r in every if r["id"] > middle]
    assert history.metrics.of("run_1", after_id=every[-1]["id"]) == []


def test_the_current_curve_cuts_inside_a_group_where_the_next_attempt_went_back(burst):
    history, logged = burst
    current = history.metrics.current("run_1")

    def kept(value: tuple) -> bool:  # attempt 1 of rank 0 went back to step 2000
        _, step, _, attempt, rank = value
        return not (attempt == 1 and rank == 0 and step is not None and step >= 2000)

    assert series(current) == logged_series([v for v in logged if kept(v)])
    assert history.metrics.current("run_1", "loss") == [r for r in current if r["name"] == "loss"]
    assert len(history.metrics.of("run_1")) - len(current) == sum(not kept(v) for v in logged)


def test_expkit_metrics_lists_every_value_of_a_burst(run_job, expkit_cli):
    result = run_job(
        {},
        script="""
        from expkit import Run
        run = Run.get_context()
        for step in range(4000):
            run.log("loss", -0.0 if step == 17 else step / 4, step=step)
            if step == 2000:
                run.log("loss", "halfway")
        run.log("acc", 0.75)
        """,
    )
    assert result.state == "completed", result.output
    shown = expkit_cli("metrics", result.record.id, "loss")
    assert shown.returncode == 0, shown.stderr
    lines = [line.split() for line in shown.stdout.splitlines()[1:]]
    assert len(lines) == 4001
    assert lines[0][:3] == ["loss", "0", "0"] and lines[17][:3] == ["loss", "17", "-0"]
    assert lines[2001][:3] == ["loss", "-", "halfway"] and lines[-1][:3] == [
        "loss",
        "3999",
        "999.8",
    ]
    history = result.workspace.history
    assert history.metrics.count(result.record.id) == 4002
    assert bits(history.metrics.of(result.record.id, "loss")[17]["value"]) == bits(-0.0)
    assert history.metrics.latest(result.record.id) == {"loss": 999.75, "acc": 0.75}


def test_a_value_sqlite_refuses_is_left_out_alone_from_its_group(expkit_workspace):
    """A name SQLite cannot store (a lone surrogate) refuses its series' group: each of its
    values is handed to `refused` as given, every other value is stored."""
    history = expkit_workspace.history
    rows = [(name, i, float(i), 1.0, 0) for i in range(5) for name in ("ok", "bad\ud800")]
    with pytest.raises(REFUSED):
        history.metrics.add_values("r", [(1, rows)])
    refused: list[tuple] = []
    stored = history.metrics.add_values(
        "r", [(1, rows)], refused=lambda row, _: refused.append(row)
    )
    assert stored == 5 and refused == [r for r in rows if r[0] != "ok"]
    assert [(r["step"], r["value"]) for r in history.metrics.of("r")] == [
        (i, float(i)) for i in range(5)
    ]


def test_a_lone_negative_zero_keeps_its_sign_and_step(expkit_workspace):
    """A value alone in its series is a plain row; a -0.0 keeps its sign all the same."""
    history = expkit_workspace.history
    history.metrics.add_values("r", [(1, [("z", 5, -0.0, 1.0, 0)]), (2, [("z", 3, 1.0, 2.0, 0)])])
    (first, second) = history.metrics.of("r")
    assert (first["step"], bits(first["value"]), first["attempt"]) == (5, bits(-0.0), 1)
    assert bits(history.metrics.latest("r")["z"]) == bits(1.0)
    assert history.metrics.current("r") == [second]  # attempt 2 went back to step 3
    history.metrics.add_values("r", [(2, [("z", 4, -0.0, 3.0, 0)])])
    assert bits(history.metrics.latest("r")["z"]) == bits(-0.0)
    assert bits(history.metrics.last_of(["r"], "z")["r"]) == bits(-0.0)


def test_groups_keep_each_series_order_and_split_where_the_kind_changes():
    rows = [
        ("a", 0, 1.0, 1.0, 0),
        ("b", None, 2.0, 1.0, 0),
        ("a", 1, 3.0, 1.0, 0),
        ("a", None, 4.0, 1.0, 0),  # no step: a new group
        ("a", None, '"x"', 1.0, 0),  # text: a group alone
        ("a", None, 5.0, 1.0, 1),  # another rank: another series
        ("b", None, 6.0, 1.0, 0),
    ]
    found = [(g[0], g[1], g[2], g[3] and list(g[3]), list(g[4])) for g in groups(rows)]
    assert found == [
        (0, "a", 0, [0, 1], [1.0, 3.0]),
        (1, "b", 0, None, [2.0, 6.0]),
        (3, "a", 0, None, [4.0]),
        (4, "a", 0, [None], ['"x"']),  # a text value alone, with its step (none)
        (5, "a", 1, None, [5.0]),
    ]


def test_a_sink_gets_every_value_of_a_burst_once_through_the_history(run_job, tmp_path):
    """The MLflow sink (a real SQLite store) pages the history by value ids: every value of
    a burst arrives once, across groups."""
    mlflow = pytest.importorskip("mlflow")
    store = tmp_path / "mlflow.db"
    result = run_job(
        {"metrics": [{"name": "mlflow", "options": {"tracking_uri": f"sqlite:///{store}"}}]},
        script="""
        from expkit import Run
        run = Run.get_context()
        for step in range(3000):
            run.log("x", step * 0.5, step=step)
            run.log("y", -step * 1.0)
        """,
    )
    assert result.state == "completed", result.output
    client = mlflow.tracking.MlflowClient(f"sqlite:///{store}")
    (run,) = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    xs = client.get_metric_history(run.info.run_id, "x")
    assert sorted((m.step, m.value) for m in xs) == [(s, s * 0.5) for s in range(3000)]
    assert len(client.get_metric_history(run.info.run_id, "y")) == 3000


def test_the_sweeps_table_counts_grouped_values_and_leaves_out_non_finite_ones(
    expkit_workspace,
):
    """`expkit sweeps show`'s table: a trial's steps, best and latest value of the primary
    metric count the values of its groups (non-finite ones left out, as before groups)."""
    from expkit.sweeps.report import trial_rows

    history = expkit_workspace.history
    job = {"experiment": "birds", "entry_script": "train.py"}
    spec = {
        "job": job,
        "search_space": {},
        "objective": {"primary_metric": "acc", "goal": "maximize"},
    }
    sweep = history.sweeps.create("birds", spec)
    run = history.runs.create("birds", job, sweep=sweep.id, trial=0)
    values = [0.5, math.inf, 0.25, -math.inf, 0.75, math.inf]
    history.metrics.add_values(run.id, [(1, [("acc", i, v, 1.0, 0) for i, v in enumerate(values)])])
    history.metrics.add(run.id, [("acc", 6, 0.1, None, 2.0, 0)])
    later = [("acc", 7, 0.9, 3.0, 0), ("acc", 8, -0.0, 3.0, 0), ("acc", 9, math.inf, 3.0, 0)]
    history.metrics.add_values(run.id, [(1, later)])
    history.runs.finish(run.id, "completed", None)

    (row,) = trial_rows(expkit_workspace, history.sweeps.get(sweep.id))
    assert (row.steps, row.best, row.latest, row.state) == (6, 0.9, -0.0, "completed")
    history.metrics.add_values(run.id, [(1, [("acc", 10, math.inf, 4.0, 0)] * 3)])
    (row,) = trial_rows(expkit_workspace, history.sweeps.get(sweep.id))
    assert (row.steps, row.latest) == (6, -0.0)


def test_the_channel_values_json_round_trip_is_what_the_pump_parses():
    """The special floats survive the channel's JSON (what BURST relies on)."""
    assert [bits(v) for v in json.loads(json.dumps(SPECIAL))] == [bits(v) for v in SPECIAL]
