"""What may cross the wire: the allow-list of what leaves a site, and the check of what arrives.

A site's client checks every outgoing reply against ``ALLOWED`` (and against its own privacy policy)
before it is sent. Everything there is a model array, an aggregate over at least
``privacy.min_aggregate_count`` cases, or a count — never a per-case value or a case id.
Incoming model arrays are checked against the site's own model (``check_incoming_arrays``) before
anything is loaded, so a server of another version, or an altered message, fails with names and
shapes instead of a torch traceback or a silent dtype cast.
"""

from __future__ import annotations

from collections.abc import Mapping
from fnmatch import fnmatchcase
from typing import Any

import numpy as np

from psp_model import __version__
from psp_model.errors import MessageError

ALLOWED: dict[str, dict[str, tuple[str, ...]]] = {
    # phase -> record kind -> name patterns
    "stats": {
        "arrays": ("nyul.*", "clinical.sums", "clinical.sum_squares", "clinical.count"),
        "metrics": ("num-examples", "n-tp", "n-psp", "n-unlabelled", "n-cases-ok", "n-cases-error", "cohort.*"),
        "configs": ("site-name", "site-roles", "clinical-features", "data-hash"),
    },
    "install": {"arrays": (), "metrics": ("num-examples",), "configs": ("encoder-hash",)},
    "ssl": {
        "arrays": ("encoder.*", "decoder.*"),
        "metrics": ("num-examples", "train-loss", "dp-epsilon"),
        "configs": (),
    },
    "finetune": {
        "arrays": ("head.*", "encoder.*"),
        "metrics": ("num-examples", "train-loss", "val-loss", "val-n", "dp-epsilon"),
        "configs": (),
    },
    "shap": {"arrays": ("shap.mean_abs",), "metrics": ("num-examples",), "configs": ("site-name",)},
    "evaluate": {
        "arrays": ("hist.*",),
        "metrics": ("num-examples", "n-tp", "n-psp", "brier-sum.*", "folds-withheld"),
        "configs": ("site-name",),
    },
}
"""Names a reply may carry, per phase. ``hist.*`` are per-class score histograms (counts per bin),
``brier-sum.*`` sums of squared errors over a site's cases, ``cohort.*`` the cohort table's means, SDs
and category counts, ``data-hash`` a digest of the site's preprocessing cache keys (provenance)."""

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


Expected = dict[str, tuple[tuple[int, ...], np.dtype]]
"""Array name -> (shape, dtype) that this site's model needs."""

_SHOWN = 5


def expected_from_state(state: Mapping[str, Any], *, prefix: str = "") -> Expected:
    """Shapes and dtypes of a torch state dict or a dict of numpy arrays, names optionally prefixed.

    ``prefix`` maps a sub-module's state onto message names (e.g. ``"encoder."`` for the frozen encoder).
    """
    return {prefix + name: (tuple(value.shape), _numpy_dtype(value)) for name, value in state.items()}


def _numpy_dtype(value: Any) -> np.dtype:
    dtype = value.dtype
    if isinstance(dtype, np.dtype):
        return dtype
    import torch  # only for torch tensors; numpy dicts never pay the import

    return torch.empty((), dtype=dtype).numpy().dtype


def check_incoming_arrays(received: Mapping[str, np.ndarray], expected: Mapping[str, tuple[tuple[int, ...], np.dtype]],
                          *, what: str) -> None:
    """Refuse a server message whose arrays do not match this site's model exactly.

    Checks names, shapes and dtypes only: values (NaN, inf, size) are the training code's business.

    Args:
        received: array name -> array, as unpacked from the message.
        expected: array name -> (shape, dtype), e.g. ``expected_from_state(model.state_dict())``.
        what: what the arrays are, for the message (``"the SSL model"``, ``"the head of fold 2"``).

    Raises:
        MessageError: listing missing and unexpected names, wrong shapes and wrong dtypes (the first
            few of each, with counts).
    """
    missing = sorted(set(expected) - set(received))
    unexpected = sorted(set(received) - set(expected))
    shapes, dtypes = [], []
    for name in sorted(set(expected) & set(received)):
        shape, dtype = expected[name]
        array = np.asarray(received[name])
        if tuple(array.shape) != tuple(shape):
            shapes.append(f"{name} has shape {tuple(array.shape)}, expected {tuple(shape)}")
        if array.dtype != np.dtype(dtype):
            dtypes.append(f"{name} has dtype {array.dtype}, expected {np.dtype(dtype)}")
    parts = [_listed(label, items) for label, items in (
        ("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes), ("wrong dtype", dtypes)) if items]
    if parts:
        raise MessageError(
            f"{what} from the server does not match this site's model: {'; '.join(parts)}. The server and this "
            f"site run different model versions or the message was altered; check psp-fl versions (this site "
            f"runs psp-fl {__version__}).")


def _listed(label: str, items: list[str]) -> str:
    more = f", ... ({len(items) - _SHOWN} more)" if len(items) > _SHOWN else ""
    return f"{len(items)} {label} ({', '.join(items[:_SHOWN])}{more})"
