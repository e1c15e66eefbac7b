"""The study's phases against a scripted Grid: what the server does with missing and failed replies."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pytest
from flwr.app import Error, Message
from flwr.supercore.task_identity import TaskIdentity

from psp_model.study import StudyConfig
from server.run_dir import RunDir
from server.study_runner import Federation, StudyError, phase_stats


class ScriptedGrid:
    """Connected nodes 1 and 2; node 1 answers every message with an error, node 2 never answers."""

    def get_node_ids(self) -> Iterable[int]:
        return [1, 2]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        for message in messages:  # as the real Grid does when it pushes them
            message.metadata.__dict__["_message_id"] = message.object_id
        return [Message(Error(code=0, reason="site statistics failed"), reply_to=m)
                for m in messages if m.metadata.dst_node_id == 1]


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """The run, node and task ids ``Message(...)`` needs; Flower sets all three in a real ServerApp process."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 7)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def test_stats_from_fewer_than_min_sites_stops_the_study_naming_each_site(tmp_path: Path) -> None:
    fed = Federation(ScriptedGrid(), StudyConfig(profile="tiny", min_sites=2, round_timeout=5.0), RunDir(tmp_path))
    with pytest.raises(StudyError) as raised:
        phase_stats(fed)
    message = str(raised.value)
    assert "0 of the 2 connected sites sent statistics, min-sites = 2" in message
    assert "failed: {1: 'site statistics failed'}" in message and "no reply within round-timeout: [2]" in message
    assert not (tmp_path / "stats.json").exists()


class RegisteringGrid:
    """Flower's simulation registers its nodes while the ServerApp starts: one node at first, then three."""

    def __init__(self) -> None:
        self.polls, self.destinations = 0, []

    def get_node_ids(self) -> Iterable[int]:
        self.polls += 1
        return [1] if self.polls == 1 else [1, 2, 3]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        self.destinations += [m.metadata.dst_node_id for m in messages]
        return []


def test_stats_waits_for_every_simulated_node(tmp_path: Path) -> None:
    grid = RegisteringGrid()
    fed = Federation(grid, StudyConfig(profile="tiny", round_timeout=5.0), RunDir(tmp_path), expected_nodes=3)
    with pytest.raises(StudyError, match="no ssl or training site sent statistics"):
        phase_stats(fed)
    assert grid.destinations == [1, 2, 3]
