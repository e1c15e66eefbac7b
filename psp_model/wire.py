"""What may leave a site: the single allow-list of record, array and metric names per message kind.

A site's client checks every outgoing reply against this list (and against its own privacy policy)
before it is sent. Everything here is a model array, an aggregate over at least
``privacy.min_aggregate_count`` cases, or a count — never a per-case value or a case id.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

ALLOWED: dict[str, dict[str, tuple[str, ...]]] = {
    # phase -> record kind -> name patterns
    "stats": {
        "arrays": ("nyul.*", "clinical.sums", "clinical.sum_squares", "clinical.count"),
        "metrics": ("num-examples", "n-tp", "n-psp", "n-unlabelled", "n-cases-ok", "n-cases-error"),
        "configs": ("site-name", "site-roles", "clinical-features"),
    },
    "install": {"arrays": (), "metrics": ("num-examples",), "configs": ("encoder-hash",)},
    "ssl": {"arrays": ("encoder.*", "decoder.*"), "metrics": ("num-examples", "train-loss"), "configs": ()},
    "finetune": {
        "arrays": ("head.*", "encoder.*"),
        "metrics": ("num-examples", "train-loss", "val-loss", "val-n"),
        "configs": (),
    },
    "evaluate": {
        "arrays": ("hist.*",),
        "metrics": ("num-examples", "n-tp", "n-psp"),
        "configs": ("site-name",),
    },
}
"""Names a reply may carry, per phase. ``hist.*`` are per-class score histograms (counts per bin)."""

PHASE_KEY = "phase"
"""Config key of every server message naming the phase it belongs to."""


def disallowed_names(phase: str, kind: str, names: list[str], *, site_patterns: tuple[str, ...] | None = None
                     ) -> list[str]:
    """Names in an outgoing reply that this allow-list (and, for model arrays, the site's policy) forbids.

    Args:
        phase: the phase of the message (a key of ``ALLOWED``); an unknown phase allows nothing.
        kind: ``arrays``, ``metrics`` or ``configs``.
        names: the names the reply carries.
        site_patterns: the site's ``privacy.allowed_arrays``; applies to model arrays
            (``encoder.*``, ``decoder.*``, ``head.*``), not to aggregate arrays.
    """
    patterns = ALLOWED.get(phase, {}).get(kind, ())
    bad = [n for n in names if not any(fnmatchcase(n, p) for p in patterns)]
    if kind == "arrays" and site_patterns is not None:
        bad += [n for n in names if n not in bad and _is_model_array(n)
                and not any(fnmatchcase(n, p) for p in site_patterns)]
    return bad


def _is_model_array(name: str) -> bool:
    return name.split(".", 1)[0] in ("encoder", "decoder", "head")
