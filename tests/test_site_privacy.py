"""The site's own DP policy applied to what leaves, with the epsilon spent counted per study."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from psp_model.errors import MessageError
from psp_model.privacy import epsilon_spent
from psp_model.site_tasks import LocalSite
from psp_model.sites import DPPolicy, load_site_config
from psp_model.study import StudyConfig


@pytest.fixture()
def site(tiny_cohort: Path, tmp_path: Path):
    config = load_site_config(tiny_cohort / "site_configs" / "burdenko.yaml")
    return replace(config, work_dir=tmp_path / "work")


def _update() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    received = {"head.w": np.zeros((4, 4), dtype=np.float32), "head.b": np.zeros(4, dtype=np.float32)}
    trained = {"head.w": np.full((4, 4), 3.0, dtype=np.float32), "head.b": np.full(4, 3.0, dtype=np.float32)}
    return trained, received


def test_without_a_policy_the_update_leaves_unchanged_and_no_epsilon_is_reported(site) -> None:
    trained, received = _update()
    metrics: dict[str, float] = {}
    released = LocalSite(site, StudyConfig()).release_update(trained, received, metrics)
    assert released is trained and "dp-epsilon" not in metrics


def test_with_a_policy_the_update_is_clipped_and_noised_and_epsilon_grows_per_release(site) -> None:
    dp = DPPolicy(clip_norm=1.0, noise_multiplier=0.5, delta=1e-5)
    local = LocalSite(replace(site, privacy=replace(site.privacy, dp=dp)), StudyConfig(run_dir="/runs/a"))
    trained, received = _update()
    epsilons = []
    for _ in range(3):
        metrics: dict[str, float] = {}
        released = local.release_update(trained, received, metrics)
        epsilons.append(metrics["dp-epsilon"])
        assert released.keys() == trained.keys()
        assert not np.allclose(released["head.w"], trained["head.w"]), "the raw update left the site"
    assert epsilons == pytest.approx([epsilon_spent(dp, n) for n in (1, 2, 3)])
    ledger = json.loads((Path(site.work_dir) / "privacy" / "dp_ledger.json").read_text())
    assert ledger == {"/runs/a#seed=0": 3}
    other_study: dict[str, float] = {}
    LocalSite(local.site, StudyConfig(run_dir="/runs/b")).release_update(trained, received, other_study)
    assert other_study["dp-epsilon"] == pytest.approx(epsilon_spent(dp, 1))


def _release_many(local: LocalSite, n: int) -> None:
    trained, received = _update()
    for _ in range(n):
        local.release_update(trained, received, {})


def test_releases_from_concurrent_processes_are_all_counted(site) -> None:
    """A site trains several folds at once (one process per message): the ledger must not lose a release."""
    import multiprocessing

    dp = DPPolicy(clip_norm=1.0, noise_multiplier=0.5, delta=1e-5)
    local = LocalSite(replace(site, privacy=replace(site.privacy, dp=dp)), StudyConfig(run_dir="/runs/c"))
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_release_many, args=(local, 15)) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
    assert [w.exitcode for w in workers] == [0, 0, 0]
    ledger = json.loads((Path(site.work_dir) / "privacy" / "dp_ledger.json").read_text())
    assert ledger == {"/runs/c#seed=0": 45}


def test_a_fold_with_too_few_validation_cases_is_withheld_alone_and_misfit_arrays_are_refused(tiny_cohort: Path) -> None:
    from psp_model.nets.encoder import MRIEncoder
    from psp_model.preprocess.clinical import build_manifest, fit_clinical_stats
    from psp_model.profiles import get_profile
    from psp_model.site_tasks import PrivacyRefusal, evaluate_site, initial_finetune_state, install_study_model

    site = load_site_config(tiny_cohort / "site_configs" / "burdenko.yaml")
    study = StudyConfig(profile="tiny", folds=5, device="cpu")

    def local_with(minimum: int) -> LocalSite:
        return LocalSite(replace(site, privacy=replace(site.privacy, min_aggregate_count=minimum)), study)

    local = local_with(5)
    local.prepare()
    sizes = [len(val) for _, val in local.folds()]
    assert sorted(sizes) == [4, 5, 5, 5, 5], "the tiny burdenko site has 24 cases"
    manifest = build_manifest(fit_clinical_stats(local.data.records, local.data.dose))
    encoder = {f"encoder.{k}": v.numpy() for k, v in MRIEncoder(get_profile("tiny").encoder).state_dict().items()}
    encoder_hash = install_study_model(local, encoder, local.data.local_landmarks(), manifest).configs["encoder-hash"]
    heads = [initial_finetune_state(study, manifest, k, encoder) for k in range(5)]

    reply = evaluate_site(local, heads, encoder_hash=encoder_hash)
    sent = sorted(int(name.removeprefix("hist.fold-")) for name in reply.arrays)
    assert sent == [k for k, n in enumerate(sizes) if n >= 5] and reply.metrics["folds-withheld"] == 1.0
    with pytest.raises(PrivacyRefusal, match="every fold has fewer than"):
        evaluate_site(local_with(6), heads, encoder_hash=encoder_hash)

    # A server message whose arrays do not fit this site's model is refused before anything loads.
    name = sorted(heads[0])[0]
    wrong_dtype = [{**head, name: head[name].astype(np.float64)} for head in heads]
    with pytest.raises(MessageError, match=rf"fold-0 model.*{re.escape(name)}.*float64"):
        evaluate_site(local, wrong_dtype, encoder_hash=encoder_hash)
    wrong_shape = [{**head, name: np.zeros((3, 3, 3), dtype=np.float32)} for head in heads]
    with pytest.raises(MessageError, match=re.escape(name)):
        evaluate_site(local, wrong_shape, encoder_hash=encoder_hash)


def test_a_site_keeps_its_optimizer_state_at_home_between_rounds(tiny_cohort: Path, tmp_path: Path) -> None:
    from psp_model.nets.encoder import MRIEncoder
    from psp_model.preprocess.clinical import build_manifest, fit_clinical_stats
    from psp_model.profiles import get_profile
    from psp_model.site_tasks import finetune_update, initial_finetune_state, install_study_model

    site = replace(load_site_config(tiny_cohort / "site_configs" / "burdenko.yaml"), work_dir=tmp_path / "work")
    keep = LocalSite(site, StudyConfig(profile="tiny", run_dir="/runs/a", finetune_local_epochs=2, device="cpu"))
    keep.prepare()
    manifest = build_manifest(fit_clinical_stats(keep.data.records, keep.data.dose))
    encoder = {f"encoder.{k}": v.numpy() for k, v in MRIEncoder(get_profile("tiny").encoder).state_dict().items()}
    encoder_hash = install_study_model(keep, encoder, keep.data.local_landmarks(), manifest).configs["encoder-hash"]
    initial = initial_finetune_state(keep.study, manifest, 0, encoder)

    def rounds(local: LocalSite, last: int) -> list[dict[str, np.ndarray]]:
        arrays, sent = initial, []
        for round_ in range(1, last + 1):
            reply = finetune_update(local, arrays, fold=0, round_=round_, encoder_hash=encoder_hash)
            assert sorted(reply.arrays) == sorted(initial), "only the head's arrays leave the site"
            arrays = reply.arrays
            sent.append(arrays)
        return sent

    kept = rounds(keep, 3)
    folder = keep.optimizer_dir(encoder_hash, 0, None)
    assert sorted(p.name for p in folder.glob("round-*.pt")) == ["round-2.pt", "round-3.pt"]
    repeated = finetune_update(keep, kept[1], fold=0, round_=3, encoder_hash=encoder_hash).arrays
    assert all(np.array_equal(repeated[k], kept[2][k]) for k in kept[2]), "a resumed round repeats exactly"

    moved = LocalSite(site, replace(keep.study, run_dir="/runs/moved", resume=True))
    assert moved.optimizer_dir(encoder_hash, 0, None) == folder, "a resumed study finds its state in a moved run dir"
    restart = LocalSite(site, replace(keep.study, keep_site_optimizer=False))
    restarted = rounds(restart, 2)
    assert not restart.optimizer_dir(encoder_hash, 0, None).exists()
    assert all(np.array_equal(restarted[0][k], kept[0][k]) for k in kept[0]), "round 1 starts cold either way"
    assert any(not np.array_equal(restarted[1][k], kept[1][k]) for k in kept[1])
