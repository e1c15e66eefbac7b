"""Flower strategies restricted to the sites of one role, refusing rounds with too few replies."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx
from flwr.supercore import log

from client.records import SIGNATURE


class TooFewRepliesError(RuntimeError):
    """A round got fewer successful replies than the study requires."""


class _SiteSubsetMixin:
    """Sends every round to all of a fixed set of nodes and checks replies.

    Replies are aggregated in site-name order, so a rerun (with new node ids) sums identically.
    Extra records (e.g. the study's Nyul landmarks) ride along in every message.
    The round log names every site that failed (``failures``: node id -> reason) or sent nothing
    before the round timeout (``missing``: node ids).
    """

    node_ids: list[int]
    min_replies: int
    extra_records: dict[str, ArrayRecord | ConfigRecord]
    round_log: list[dict]
    site_names: dict[int, str] = {}
    sign: Callable[[RecordDict], bytes] | None = None
    _sent: Iterable[Message] = ()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config, **self.extra_records})
        if self.sign is not None:
            config[SIGNATURE] = self.sign(record)
        self.round_log.append({"round": server_round, "nodes": len(self.node_ids),
                               "bytes_to_each_site": arrays.count_bytes()})
        # Kept: the Grid sets their message ids when it pushes them, which is how replies are traced back.
        self._sent = self._construct_messages(record, sorted(self.node_ids), MessageType.TRAIN)
        return self._sent

    def reply_site(self, reply: Message) -> int:
        """The node a reply answers for: the SuperLink answers for an unreachable node under its own id."""
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in self._sent}
        return sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        ok = sorted((m for m in replies if not m.has_error()),
                    key=lambda m: self.site_names.get(m.metadata.src_node_id, str(m.metadata.src_node_id)))
        failures = {self.reply_site(m): m.error.reason for m in replies if m.has_error()}
        missing = sorted(set(self.node_ids) - {self.reply_site(m) for m in replies})
        entry = self.round_log[-1]
        entry.update({
            "replies": len(ok),
            "failures": failures,
            "missing": missing,
            "bytes_from_each_site": [m.content[self.arrayrecord_key].count_bytes() for m in ok
                                     if self.arrayrecord_key in m.content],
        })
        left_out = {self.site_names.get(n, str(n)): reason for n, reason in failures.items()}
        left_out.update({self.site_names.get(n, str(n)): "no reply within round-timeout" for n in missing})
        for site, reason in left_out.items():
            log(WARNING, "round %d: site %s left out: %s", server_round, site, reason)
        if len(ok) < self.min_replies:
            raise TooFewRepliesError(
                f"round {server_round}: only {len(ok)} of {len(self.node_ids)} sites replied successfully "
                f"(min-replies = {self.min_replies}); left out: {left_out}. "
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
