"""The Flower ClientApp: unpack a server message, call psp_model.site_tasks, pack the reply."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client.guard import make_guard_mod
from client.records import ARRAYS, CONFIG, reply_record, to_arrays
from client.site import local_site
from psp_model.preprocess.clinical import FeatureManifest
from psp_model.site_tasks import (
    evaluate_site,
    finetune_update,
    install_study_model,
    landmarks_from_arrays,
    site_statistics,
    ssl_update,
)
from psp_model.study import StudyConfig
from psp_model.wire import PHASE_KEY


def build_client_app(study: StudyConfig | None = None) -> ClientApp:
    """The ClientApp; ``study`` replaces the run config (Flower's in-process simulation has none)."""
    app = ClientApp(mods=[make_guard_mod(study)])

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        """``stats``: aggregate statistics; ``install``: keep the frozen encoder, landmarks and manifest."""
        local, config = local_site(context, study), msg.content[CONFIG]
        if config[PHASE_KEY] == "stats":
            return Message(reply_record(site_statistics(local)), reply_to=msg)
        arrays = to_arrays(msg.content[ARRAYS])
        reply = install_study_model(
            local,
            {k: v for k, v in arrays.items() if k.startswith("encoder.")},
            landmarks_from_arrays(to_arrays(msg.content["nyul"])),
            FeatureManifest.from_json(str(config["manifest-json"])),
        )
        return Message(reply_record(reply), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        """``ssl``: an encoder + decoder update; ``finetune``: a head update for one fold."""
        local, config = local_site(context, study), msg.content[CONFIG]
        arrays = to_arrays(msg.content[ARRAYS])
        round_ = int(config["round-offset"]) + int(config["server-round"])
        if config[PHASE_KEY] == "ssl":
            reply = ssl_update(local, arrays, landmarks_from_arrays(to_arrays(msg.content["nyul"])), round_=round_)
        else:
            reply = finetune_update(local, arrays, fold=int(config["fold"]), round_=round_,
                                    encoder_hash=str(config["encoder-hash"]),
                                    proximal_mu=float(config.get("proximal-mu", 0.0)))
        return Message(reply_record(reply), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        """Score histograms of the fold models (test sites: and of their soft-voting ensemble)."""
        local, config = local_site(context, study), msg.content[CONFIG]
        heads = [to_arrays(msg.content[f"fold-{k}"]) for k in range(int(config["folds"]))]
        reply = evaluate_site(local, heads, encoder_hash=str(config["encoder-hash"]))
        return Message(reply_record(reply), reply_to=msg)

    return app


app = build_client_app()
