"""Role-restricted strategies: every eligible site gets the round, with FedProx's mu when selected.

Flower builds a Message only inside a running app, so these tests capture what the strategy would
send (the record and its destinations) instead of the Message objects.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

from server.strategy import SiteFedAvg, SiteFedProx


def _arrays() -> ArrayRecord:
    return ArrayRecord({"head.w": Array(np.zeros(4, dtype=np.float32))})


def _sent(strategy, monkeypatch) -> tuple:
    monkeypatch.setattr(strategy, "_construct_messages", lambda record, nodes, kind: (record, list(nodes), kind))
    return strategy.configure_train(1, _arrays(), ConfigRecord({"phase": "finetune"}), grid=None)


def test_fedprox_sends_mu_to_every_eligible_site(monkeypatch) -> None:
    strategy = SiteFedProx([11, 7, 3], min_replies=2, proximal_mu=0.05)
    record, nodes, kind = _sent(strategy, monkeypatch)
    assert nodes == [3, 7, 11] and kind == "train"
    assert record["config"]["proximal-mu"] == 0.05 and record["config"]["server-round"] == 1
    assert strategy.round_log[-1]["bytes_to_each_site"] == _arrays().count_bytes()


def test_fedavg_sends_no_proximal_term(monkeypatch) -> None:
    record, nodes, _ = _sent(SiteFedAvg([2, 1], min_replies=1), monkeypatch)
    assert nodes == [1, 2] and "proximal-mu" not in record["config"]
