"""Client-side Flower mod that decides, at the site, what may leave — whatever the server asked.

Every reply is checked against the allow-list of :mod:`psp_model.wire` and the site's own
``privacy.allowed_arrays``; a reply that fails, or a task the site's policy refuses, goes back as a
failed reply with the reason, never as data. Every outgoing message is written to the site's
hash-chained audit log (names, shapes, bytes, SHA-256 of the payload).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from flwr.app import ArrayRecord, Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.constant import ErrorCode

from client.site import local_site
from psp_model.audit import append_audit_entry
from psp_model.errors import CaseError, ConfigError, MessageError, SignatureError
from psp_model.site_tasks import PrivacyRefusal
from psp_model.study import StudyConfig
from psp_model.wire import PHASE_KEY, disallowed_names

AUDIT_FILE = Path("audit") / "outgoing.jsonl"


def make_guard_mod(study: StudyConfig | None = None) -> Mod:
    """The guard as a Flower mod (``study`` as for ``build_client_app``)."""

    def outgoing_guard_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        return guard(msg, context, call_next, study)

    return outgoing_guard_mod


def guard(msg: Message, context: Context, call_next: ClientAppCallable, study: StudyConfig | None) -> Message:
    """Run the task, refuse what may not leave, log what does."""
    phase = str(msg.content["config"][PHASE_KEY]) if "config" in msg.content else "unknown"
    try:
        local = local_site(context, study)
    except ConfigError as exc:
        return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(exc).__name__}: {exc}"), reply_to=msg)
    header = {"run": msg.metadata.run_id, "phase": phase, "message": msg.metadata.message_type, "round": _round(msg)}
    try:
        reply = call_next(msg, context)
    except (PrivacyRefusal, ConfigError, CaseError, FileNotFoundError, MessageError, SignatureError) as exc:
        reason = f"{type(exc).__name__}: {exc}"
        append_audit_entry(Path(local.site.work_dir) / AUDIT_FILE,
                           {**header, "sent": False, "arrays": {}, "metrics": [], "configs": [], "bytes": 0,
                            "refused": [reason]})
        return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=msg)
    if reply.has_error():
        return reply
    problems = _violations(reply, phase, local.site.privacy.allowed_arrays)
    audit = {**header, "sent": not problems, **_describe(reply)}
    if problems:
        audit["refused"] = problems
    append_audit_entry(Path(local.site.work_dir) / AUDIT_FILE, audit)
    if problems:
        return Message(Error(ErrorCode.MOD_FAILED_PRECONDITION,
                             f"site {local.site.name} refused to send: {'; '.join(problems)}"), reply_to=msg)
    return reply


def _violations(reply: Message, phase: str, site_patterns: tuple[str, ...]) -> list[str]:
    problems = []
    for key, record in reply.content.items():
        kind = {"arrays": "arrays", "metrics": "metrics", "config": "configs"}.get(key)
        if kind is None:
            problems.append(f"record '{key}' is not an allowed record")
            continue
        bad = disallowed_names(phase, kind, list(record.keys()),
                               site_patterns=site_patterns if kind == "arrays" else None)
        if bad:
            problems.append(f"{kind} {bad} are not allowed in phase '{phase}'")
    return problems


def _describe(reply: Message) -> dict:
    arrays, digest, total = {}, hashlib.sha256(), 0
    for key, record in reply.content.items():
        if isinstance(record, ArrayRecord):
            for name, array in record.items():
                arrays[name] = list(array.shape)
                digest.update(name.encode())
                digest.update(array.data)
                total += len(array.data)
        else:
            for name, value in record.items():
                digest.update(f"{key}.{name}={value!r}".encode())
    return {
        "arrays": arrays,
        "metrics": sorted(reply.content["metrics"].keys()) if "metrics" in reply.content else [],
        "configs": sorted(reply.content["config"].keys()) if "config" in reply.content else [],
        "bytes": total,
        "sha256": digest.hexdigest(),
    }


def _round(msg: Message) -> int:
    config = msg.content["config"] if "config" in msg.content else {}
    return int(config.get("server-round", 0))
