"""Incoming server messages are checked against the site's own model before anything is loaded."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from psp_model.errors import MessageError
from psp_model.wire import check_incoming_arrays, expected_from_state


@pytest.fixture
def model_state() -> dict[str, torch.Tensor]:
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3)).state_dict()


def _as_message(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {name: value.numpy().copy() for name, value in state.items()}


def test_a_matching_message_passes(model_state) -> None:
    check_incoming_arrays(_as_message(model_state), expected_from_state(model_state), what="the head")


def test_expected_from_state_reads_torch_and_numpy_alike(model_state) -> None:
    from_torch = expected_from_state(model_state)
    assert from_torch == expected_from_state(_as_message(model_state))
    assert from_torch["0.weight"] == ((3, 4), np.dtype(np.float32))
    assert set(expected_from_state(model_state, prefix="encoder.")) == {f"encoder.{k}" for k in model_state}


def test_missing_names_are_listed(model_state) -> None:
    message = _as_message(model_state)
    del message["0.bias"]
    with pytest.raises(MessageError, match=r"the head from the server .*1 missing \(0\.bias\)"):
        check_incoming_arrays(message, expected_from_state(model_state), what="the head")


def test_an_extra_array_is_refused(model_state) -> None:
    message = {**_as_message(model_state), "decoder.sneaky": np.zeros(2, np.float32)}
    with pytest.raises(MessageError, match=r"1 unexpected \(decoder\.sneaky\)"):
        check_incoming_arrays(message, expected_from_state(model_state), what="the head")


def test_a_wrong_shape_names_both_shapes(model_state) -> None:
    message = {**_as_message(model_state), "0.weight": np.zeros((3, 5), np.float32)}
    with pytest.raises(MessageError, match=r"1 wrong shape \(0\.weight has shape \(3, 5\), expected \(3, 4\)\)"):
        check_incoming_arrays(message, expected_from_state(model_state), what="the head")


def test_float64_is_not_silently_cast_to_float32(model_state) -> None:
    message = {**_as_message(model_state), "1.weight": np.ones(3, np.float64)}
    with pytest.raises(MessageError, match=r"1 wrong dtype \(1\.weight has dtype float64, expected float32\)"):
        check_incoming_arrays(message, expected_from_state(model_state), what="the head")


def test_every_kind_of_mismatch_is_reported_at_once_with_counts_and_the_fix() -> None:
    expected = {f"w{i}": ((2,), np.dtype(np.float32)) for i in range(8)}
    message = {f"w{i}": np.zeros(2, np.float32) for i in range(1, 8)}
    message.update({f"x{i}": np.zeros(2, np.float32) for i in range(7)})
    message["w1"] = np.zeros(3, np.float32)
    message["w2"] = np.zeros(2, np.int64)
    with pytest.raises(MessageError) as caught:
        check_incoming_arrays(message, expected, what="the SSL model")
    text = str(caught.value)
    assert "1 missing (w0)" in text
    assert "7 unexpected (x0, x1, x2, x3, x4, ... (2 more))" in text
    assert "1 wrong shape (w1 has shape (3,), expected (2,))" in text
    assert "1 wrong dtype (w2 has dtype int64, expected float32)" in text
    assert "different model versions or the message was altered; check psp-fl versions" in text


def test_values_are_not_this_checks_business(model_state) -> None:
    """NaN or inf weights have the right names, shapes and dtypes: training, not this check, deals with them."""
    message = {name: np.full_like(value, np.nan) for name, value in _as_message(model_state).items()}
    check_incoming_arrays(message, expected_from_state(model_state), what="the head")
