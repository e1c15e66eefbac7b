"""Property tests of the user-written inputs: clinical rows and CSVs, and site configs.

Whatever a site types into ``clinical.csv`` or its YAML, psp-fl answers with a valid record or config, or
with the one error type that names the case (``CaseError``) or the key (``ConfigError``) — never another
exception, and never a NaN in a record. Deterministic (``derandomize``) and without an example database,
so every run checks the same examples.
"""

from __future__ import annotations

import csv
import math
import re
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from psp_model import schema
from psp_model.errors import CaseError, ConfigError
from psp_model.layouts.psp_case import read_psp_case
from psp_model.preprocess.clinical import AGE_RANGE, ClinicalRecord, parse_clinical
from psp_model.sites import LAYOUTS, ROLES, SiteConfig, load_site_config, site_config_from_dict

PROPERTY = settings(max_examples=60, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

CASE_ID = "Case-001"

# ---------------------------------------------------------------------------------------------- clinical rows

valid_values = st.fixed_dictionaries({
    "label": st.sampled_from(list(schema.LABELS)),
    "age": st.floats(*AGE_RANGE),
    "sex": st.sampled_from(schema.CATEGORICAL["sex"]),
    "idh": st.sampled_from(schema.CATEGORICAL["idh"]),
    "mgmt": st.sampled_from(schema.CATEGORICAL["mgmt"]),
    "days_since_rt": st.floats(0, 1e5),
})
number_like = st.sampled_from(["nan", "NaN", "inf", "-inf", "1e400", "-0", "0x10", "1_0", " 7 ", "", "٣", "1e-400"])
any_text = st.one_of(st.text(max_size=30), number_like, st.sampled_from(["TP", "PsP", "M", "F", "unknown"]))


def _text_row(values: dict) -> dict[str, str]:
    return {"case_id": CASE_ID, **{k: v if isinstance(v, str) else repr(v) for k, v in values.items()}}


@st.composite
def messy_rows(draw) -> dict[str, str]:
    """A valid row with any subset of its columns replaced by arbitrary text or dropped."""
    row = _text_row(draw(valid_values))
    for column in schema.CLINICAL_COLUMNS[1:]:
        action = draw(st.sampled_from(["keep", "keep", "text", "drop"]))
        if action == "text":
            row[column] = draw(any_text)
        elif action == "drop":
            del row[column]
    return row


def _check_record(record: ClinicalRecord) -> None:
    assert record.case_id == CASE_ID
    assert record.label in (0, 1, None)
    assert math.isfinite(record.age) and AGE_RANGE[0] <= record.age <= AGE_RANGE[1]
    assert math.isfinite(record.days_since_rt) and record.days_since_rt >= 0
    assert all(getattr(record, column) in allowed for column, allowed in schema.CATEGORICAL.items())


@PROPERTY
@given(messy_rows(), st.booleans())
def test_any_clinical_row_parses_or_names_the_case(row: dict[str, str], require_label: bool) -> None:
    try:
        record = parse_clinical(CASE_ID, row, require_label=require_label)
    except CaseError as exc:
        assert exc.case_id == CASE_ID and str(exc).startswith(f"{CASE_ID}: ") and exc.reason
    else:
        _check_record(record)


@PROPERTY
@given(valid_values)
def test_valid_clinical_rows_round_trip(values: dict) -> None:
    record = parse_clinical(CASE_ID, _text_row(values), require_label=True)
    assert record == ClinicalRecord(CASE_ID, schema.LABELS[values["label"]], values["age"], values["sex"],
                                    values["idh"], values["mgmt"], values["days_since_rt"])


# ------------------------------------------------------------------------------------- clinical.csv on disk

folder_ids = st.lists(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,8}", fullmatch=True), min_size=1, max_size=4,
                      unique=True)


def _write_csv(root: Path, rows: list[dict[str, str]]) -> None:
    with (root / schema.CLINICAL_FILE).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=schema.CLINICAL_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


@PROPERTY
@given(folder_ids, st.data())
def test_any_text_in_clinical_csv_reads_then_parses_or_names_the_case(ids: list[str], data) -> None:
    rows = []
    for case_id in ids:
        row = {**_text_row(data.draw(valid_values)), "case_id": case_id}
        for column in data.draw(st.sets(st.sampled_from(schema.CLINICAL_COLUMNS))):
            row[column] = data.draw(any_text)
        rows.append(row)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for case_id in ids:
            (root / case_id).mkdir()
        _write_csv(root, rows)
        listing = read_psp_case(root)
        for problem in listing.problems:
            assert problem.reason
        assert {c.case_id for c in listing.cases} | {p.case_id for p in listing.problems} >= set(ids)
        for case in listing.cases:
            try:
                record = parse_clinical(case.case_id, case.clinical, require_label=True)
            except CaseError as exc:
                assert exc.case_id == case.case_id
            else:
                assert record.case_id == case.case_id and math.isfinite(record.age + record.days_since_rt)


@PROPERTY
@given(folder_ids, st.data())
def test_valid_rows_round_trip_through_clinical_csv(ids: list[str], data) -> None:
    values = {case_id: data.draw(valid_values) for case_id in ids}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for case_id in ids:
            (root / case_id).mkdir()
        _write_csv(root, [{**_text_row(v), "case_id": case_id} for case_id, v in values.items()])
        listing = read_psp_case(root)
    assert not listing.problems and sorted(c.case_id for c in listing.cases) == sorted(ids)
    for case in listing.cases:
        v = values[case.case_id]
        assert parse_clinical(case.case_id, case.clinical, require_label=True) == ClinicalRecord(
            case.case_id, schema.LABELS[v["label"]], v["age"], v["sex"], v["idh"], v["mgmt"], v["days_since_rt"])


@PROPERTY
@given(st.binary(max_size=300), st.sampled_from([b"", "\ufeff".encode(), ",".join(schema.CLINICAL_COLUMNS).encode()
                                                 + b"\n"]))
def test_any_bytes_as_clinical_csv_list_cases_or_raise_config_error(body: bytes, head: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "case-a").mkdir()
        (root / schema.CLINICAL_FILE).write_bytes(head + body)
        try:
            listing = read_psp_case(root)
        except ConfigError as exc:
            assert schema.CLINICAL_FILE in str(exc) and "Fix:" in str(exc)
        else:
            assert all(isinstance(c.clinical, dict | None) for c in listing.cases)


def test_a_byte_order_mark_from_excel_is_accepted(tmp_path: Path) -> None:
    (tmp_path / CASE_ID).mkdir()
    _write_csv(tmp_path, [_text_row({"label": "TP", "age": "61", "sex": "M", "idh": "unknown", "mgmt": "unknown",
                                     "days_since_rt": "90"})])
    path = tmp_path / schema.CLINICAL_FILE
    path.write_bytes("\ufeff".encode() + path.read_bytes())
    assert read_psp_case(tmp_path).cases[0].clinical["case_id"] == CASE_ID


def test_a_clinical_csv_that_is_not_utf8_names_the_file_and_the_fix(tmp_path: Path) -> None:
    (tmp_path / schema.CLINICAL_FILE).write_bytes(",".join(schema.CLINICAL_COLUMNS).encode() + b"\nM\xfcller,TP\n")
    with pytest.raises(ConfigError, match=r"clinical\.csv: not UTF-8 text .*Fix: save it as UTF-8"):
        read_psp_case(tmp_path)


def test_an_unreadable_csv_names_the_file_and_the_fix(tmp_path: Path) -> None:
    (tmp_path / schema.CLINICAL_FILE).write_text(",".join(schema.CLINICAL_COLUMNS) + "\n" + "x" * 200_000 + "\n")
    with pytest.raises(ConfigError, match=r"clinical\.csv: not a readable CSV file \(field larger .*Fix: save it"):
        read_psp_case(tmp_path)


# ---------------------------------------------------------------------------------------------- site configs

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**20), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from([*ROLES, *LAYOUTS, "head.*", "~nobody-here/x", "", "."]))
keys = st.one_of(st.sampled_from([f.name for f in SiteConfig.__dataclass_fields__.values()] +
                                 ["min_aggregate_count", "allowed_arrays", "colour"]),
                 st.text(max_size=8), st.integers(-3, 3), st.booleans(), st.none())
yaml_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(keys, inner, max_size=4)), max_leaves=12)

VALID = {"name": "site-a", "roles": ["train"], "layout": "psp-case", "root": ".", "enhancing_labels": [1, 4],
         "privacy": {"min_aggregate_count": 5, "allowed_arrays": ["head.*"]}}


path_text = st.one_of(st.sampled_from(["~nobody-here/x", "~", "a\x00b", "/", "..", "", " "]), st.text(max_size=10))


@st.composite
def mutated_configs(draw) -> dict:
    """The valid config with a path key set to odd text, then a few keys dropped, replaced by any value, or added."""
    config = {**VALID, "privacy": dict(VALID["privacy"])}
    config[draw(st.sampled_from(["root", "work_dir", "model_signing_key"]))] = draw(path_text)
    for _ in range(draw(st.integers(1, 3))):
        target = config["privacy"] if draw(st.booleans()) and isinstance(config.get("privacy"), dict) else config
        key = draw(st.sampled_from(sorted(target, key=str)) | keys)
        if draw(st.booleans()) and key in target:
            del target[key]
        else:
            target[key] = draw(yaml_values)
    return config


def _load(config: object, folder: Path, *, require_root: bool) -> SiteConfig | ConfigError:
    path = folder / "site.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    try:
        return load_site_config(path, require_root=require_root)
    except ConfigError as exc:
        return exc


def _check_outcome(outcome: SiteConfig | ConfigError) -> None:
    if isinstance(outcome, ConfigError):
        assert outcome.problems
        for problem in outcome.problems:
            assert re.search(r"site\.yaml: key '.*': .*Fix: ", problem, re.DOTALL), problem
        return
    assert re.fullmatch(r"[a-z0-9][a-z0-9_-]*", outcome.name)
    assert outcome.roles and set(outcome.roles) <= set(ROLES) and outcome.layout in LAYOUTS
    assert all(type(v) is int and v > 0 for v in outcome.enhancing_labels)
    assert type(outcome.privacy.min_aggregate_count) is int and outcome.privacy.min_aggregate_count >= 1


@PROPERTY
@given(st.dictionaries(keys, yaml_values, max_size=6), st.booleans())
def test_any_yaml_mapping_loads_or_raises_config_error_naming_a_key(config: dict, require_root: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        _check_outcome(_load(config, Path(tmp), require_root=require_root))


@PROPERTY
@given(mutated_configs(), st.booleans())
def test_a_mutated_valid_config_loads_or_raises_config_error_naming_a_key(config: dict, require_root: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        _check_outcome(_load(config, Path(tmp), require_root=require_root))


@PROPERTY
@given(st.binary(max_size=200))
def test_any_bytes_as_a_site_config_raise_config_error(body: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "site.yaml"
        path.write_bytes(body)
        try:
            load_site_config(path, require_root=False)
        except ConfigError as exc:
            assert str(path) in str(exc) and "Fix:" in str(exc)


def test_the_valid_config_loads(tmp_path: Path) -> None:
    assert isinstance(_load(VALID, tmp_path, require_root=True), SiteConfig)


@pytest.mark.parametrize(("change", "match"), [
    ({"root": "~nobody-here/data"}, r"key 'root': '~nobody-here/data' is not a usable path \(Could not determine "
                                    r"home directory\.\)\. Fix: give a plain path"),
    ({"work_dir": "a\x00b"}, r"key 'work_dir': 'a\\x00b' is not a usable path \(it contains a NUL character\)"),
    ({1: "x", "colour": "blue"}, r"key '1': unknown key"),
    ({"name": "site-a\n"}, r"key 'name': 'site-a\\n' is not a valid site name"),
    ({"enhancing_labels": [True]}, r"key 'enhancing_labels': expected a list of positive integers, got \[True\]"),
])
def test_fixed_config_crashes_are_config_errors(tmp_path: Path, change: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        site_config_from_dict({**VALID, **change}, source=tmp_path / "site.yaml", require_root=False)
