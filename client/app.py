"""The Flower ClientApp: unpack a server message, call psp_model.site_tasks, pack the reply."""

from __future__ import annotations

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from client.guard import make_guard_mod
from client.records import (
    ARRAYS,
    CONFIG,
    SIGNATURE,
    reply_record,
    signed_digest,
    to_arrays,
)
from client.site import local_site
from psp_model.preprocess.clinical import FeatureManifest
from psp_model.signing import load_public_key, verify_bytes
from psp_model.site_tasks import (
    LocalSite,
    evaluate_site,
    finetune_update,
    install_study_model,
    landmarks_from_arrays,
    shap_update,
    site_statistics,
    ssl_update,
)
from psp_model.study import StudyConfig
from psp_model.wire import PHASE_KEY


def verify_signature(local: LocalSite, content: RecordDict, what: str) -> None:
    """Refuse a model the site cannot trust: with ``model_signing_key`` set, unsigned or altered ones."""
    key_path = local.site.model_signing_key
    if key_path is None:
        return
    signature = content[CONFIG].get(SIGNATURE)
    verify_bytes(signed_digest(content), None if signature is None else bytes(signature),
                 load_public_key(key_path), what=f"{what} (site {local.site.name})")


def build_client_app(study: StudyConfig | None = None) -> ClientApp:
    """The ClientApp; ``study`` replaces the run config (Flower's in-process simulation has none)."""
    app = ClientApp(mods=[make_guard_mod(study)])

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        """``stats``: aggregate statistics; ``install``: keep the frozen encoder, landmarks and manifest;
        ``shap``: mean |SHAP| of the clinical/dose features over the site's validation folds."""
        local, config = local_site(context, study), msg.content[CONFIG]
        if config[PHASE_KEY] == "stats":
            return Message(reply_record(site_statistics(local)), reply_to=msg)
        if config[PHASE_KEY] == "shap":
            verify_signature(local, msg.content, "the fold models to explain")
            reply = shap_update(local, _fold_models(msg), encoder_hash=str(config["encoder-hash"]))
            return Message(reply_record(reply), reply_to=msg)
        verify_signature(local, msg.content, "the study's frozen encoder, landmarks and feature manifest")
        arrays = to_arrays(msg.content[ARRAYS])
        reply = install_study_model(
            local,
            arrays,
            landmarks_from_arrays(to_arrays(msg.content["nyul"])),
            FeatureManifest.from_json(str(config["manifest-json"])),
        )
        return Message(reply_record(reply), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        """``ssl``: an encoder + decoder update; ``finetune``: a head update for one fold."""
        local, config = local_site(context, study), msg.content[CONFIG]
        round_ = int(config["server-round"])
        verify_signature(local, msg.content, f"the global model of {config[PHASE_KEY]} round {round_}")
        arrays = to_arrays(msg.content[ARRAYS])
        if config[PHASE_KEY] == "ssl":
            reply = ssl_update(local, arrays, landmarks_from_arrays(to_arrays(msg.content["nyul"])), round_=round_)
        else:
            reply = finetune_update(local, arrays, fold=int(config["fold"]), round_=round_,
                                    encoder_hash=str(config["encoder-hash"]),
                                    proximal_mu=float(config.get("proximal-mu", 0.0)), features=_features(config))
        return Message(reply_record(reply), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        """Score histograms of the fold models (test sites: and of their soft-voting ensemble)."""
        local, config = local_site(context, study), msg.content[CONFIG]
        verify_signature(local, msg.content, "the fold models to evaluate")
        reply = evaluate_site(local, _fold_models(msg), encoder_hash=str(config["encoder-hash"]),
                              features=_features(config))
        return Message(reply_record(reply), reply_to=msg)

    return app


def _fold_models(msg: Message) -> list[dict]:
    return [to_arrays(msg.content[f"fold-{k}"]) for k in range(int(msg.content[CONFIG]["folds"]))]


def _features(config) -> list[str] | None:
    """The clinical/dose features a feature-selection run keeps (None: all of the manifest)."""
    return [str(f) for f in config["features"]] if "features" in config else None


app = build_client_app()
