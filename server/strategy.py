"""Flower strategies restricted to the sites of one role, refusing rounds with too few replies."""

from __future__ import annotations

from collections.abc import Iterable
from logging import WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx
from flwr.supercore import log


class TooFewRepliesError(RuntimeError):
    """A round got fewer successful replies than the study requires."""


class _SiteSubsetMixin:
    """Sends every round to all of a fixed set of nodes and checks replies.

    Replies are aggregated in site-name order, so a rerun (with new node ids) sums identically.
    Extra records (e.g. the study's Nyul landmarks) ride along in every message.
    """

    node_ids: list[int]
    min_replies: int
    extra_records: dict[str, ArrayRecord | ConfigRecord]
    round_log: list[dict]
    site_names: dict[int, str] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config, **self.extra_records})
        self.round_log.append({"round": server_round, "nodes": len(self.node_ids),
                               "bytes_to_each_site": arrays.count_bytes()})
        return self._construct_messages(record, sorted(self.node_ids), MessageType.TRAIN)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        ok = sorted((m for m in replies if not m.has_error()),
                    key=lambda m: self.site_names.get(m.metadata.src_node_id, str(m.metadata.src_node_id)))
        failures = {m.metadata.src_node_id: m.error.reason for m in replies if m.has_error()}
        entry = self.round_log[-1]
        entry.update({
            "replies": len(ok),
            "failures": failures,
            "bytes_from_each_site": [m.content[self.arrayrecord_key].count_bytes() for m in ok
                                     if self.arrayrecord_key in m.content],
        })
        if len(ok) < self.min_replies:
            log(WARNING, "round %d: %d successful replies, %d required; failures: %s",
                server_round, len(ok), self.min_replies, failures)
            raise TooFewRepliesError(
                f"round {server_round}: only {len(ok)} of {len(replies)} sites replied successfully "
                f"(min-replies = {self.min_replies}); failures: {failures or 'timeout'}. "
                "Fix the failing sites or lower min-replies, then rerun with resume=true.")
        arrays, metrics = super().aggregate_train(server_round, ok)
        if metrics is not None:
            entry["metrics"] = dict(metrics)
        return arrays, metrics


class SiteFedAvg(_SiteSubsetMixin, FedAvg):
    """FedAvg (weighted by ``num-examples``) over ``node_ids``."""

    def __init__(self, node_ids: list[int], *, min_replies: int,
                 extra_records: dict[str, ArrayRecord | ConfigRecord] | None = None) -> None:
        super().__init__(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=len(node_ids),
                         min_available_nodes=len(node_ids))
        self.node_ids, self.min_replies = list(node_ids), min_replies
        self.extra_records, self.round_log = dict(extra_records or {}), []


class SiteFedProx(_SiteSubsetMixin, FedProx):
    """FedProx over ``node_ids``: sites add ``proximal_mu / 2 * ||w - w_global||^2`` to their loss."""

    def __init__(self, node_ids: list[int], *, min_replies: int, proximal_mu: float,
                 extra_records: dict[str, ArrayRecord | ConfigRecord] | None = None) -> None:
        super().__init__(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=len(node_ids),
                         min_available_nodes=len(node_ids), proximal_mu=proximal_mu)
        self.node_ids, self.min_replies = list(node_ids), min_replies
        self.extra_records, self.round_log = dict(extra_records or {}), []

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        config["proximal-mu"] = self.proximal_mu
        return super().configure_train(server_round, arrays, config, grid)
