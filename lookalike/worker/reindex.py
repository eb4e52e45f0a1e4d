"""Model upgrade without downtime: every indexed instance embedded again by a new checkpoint, then one switch.

``lookalike reindex --encoder us --model FILE`` (without ``--model``: the settings' checkpoint, the shipped one
unless ``Settings.weights`` names another) queues a re-index task per instance that has a vector of the
encoder's active model and none of the new one; the worker writes the new vectors beside the old ones (the
catalogue keys rows by model version), and lookups keep to the active model meanwhile. Once every instance has
its new vector, the catalogue's active model changes in one transaction: lookups and new instances move to the
new model at once. A last round re-embeds what arrived under the old model in between, and then the old model's
vectors and FAISS files are removed.

A re-index to the model already active, with no other model's vectors left to replace, would do nothing and
report a switch: it is refused (:class:`ReindexRefused`) with the reason. With another model's vectors still
there (a run that switched but could not retire them), the same command finishes that run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from lookalike.config import TASK_REINDEX_INSTANCE
from lookalike.worker.backfill import Backfill, BackfillReport, Progress
from lookalike.index.store import IndexStore
from lookalike.index.upgrade import keep_archive_model
from lookalike.orthanc.client import OrthancApi


class ReindexRefused(ValueError):
    """A re-index that would change nothing; its message says why, for the administrator who asked."""


def refusal(store: IndexStore, encoder: str, model_version: str, default_model: str) -> str | None:
    """Why re-indexing ``encoder`` to ``model_version`` would change nothing, or None when it has work to do.

    ``default_model`` is the model version of the checkpoint the settings name (the active one while the catalogue
    records none).
    """
    recorded = store.catalogue.active_model(encoder)
    active = recorded[0] if recorded else default_model
    others = sorted(v for v in store.catalogue.live_versions(encoder) if v != model_version)
    if model_version != active or others:
        return None
    return (f"{model_version} is already the active {encoder} model: every {encoder} instance is indexed with it and"
            " lookups use it; give a checkpoint of another model version (lookalike train --out)")


@dataclass
class ReindexReport:
    encoder: str
    old_models: list[str]
    new_model: str
    rounds: list[BackfillReport]
    switched: bool
    retired_vectors: int

    def as_dict(self) -> dict:
        return {"encoder": self.encoder, "old_models": self.old_models, "new_model": self.new_model,
                "switched": self.switched, "retired_vectors": self.retired_vectors,
                "rounds": [r.as_dict() for r in self.rounds]}


def reindex(api: OrthancApi, store: IndexStore, send: Callable[[str, list, dict], None], encoder: str,
            model_version: str, weights: str, *, default_weights: str = "", default_model: str = "", batch: int = 32,
            rate: float = 20.0, settle_timeout: float = 600.0, max_rounds: int = 5,
            progress: Callable[[int], Progress] | None = None) -> ReindexReport:
    """Re-embed everything of ``encoder`` with the checkpoint ``weights`` (of ``model_version``), then switch.

    Parameters
    ----------
    store
        The writable index (the switch and the removal of the old model are written here).
    default_weights
        The checkpoint the settings name for ``encoder`` ("" for the shipped one): recorded as the active model
        before the first round when none is recorded yet, so that lookups keep to it while the new one is built.
    default_model
        The model version of ``default_weights``: with none recorded, the model that is active.
    max_rounds
        Rounds before the switch; each re-embeds what lacks a new vector (instances keep arriving meanwhile).
    progress
        Called with a round's number of instances, returns a progress bar for it.

    Returns
    -------
    ReindexReport
        ``switched`` is False when instances still lacked a new vector after ``max_rounds`` (or failed): the old
        model then stays active and nothing is removed.

    Raises
    ------
    ReindexRefused
        ``model_version`` is the active model and no other model's vectors are left (see :func:`refusal`);
        nothing is queued or written.
    """
    # An archive of an earlier shipped model that nothing started since the update: recorded as the worker would,
    # so that lookups and new instances stay on it while the new vectors are built (lookalike.index.upgrade).
    keep_archive_model(store.catalogue, encoder, default_weights)
    reason = refusal(store, encoder, model_version, default_model)
    if reason is not None:
        raise ReindexRefused(reason)
    catalogue = store.catalogue
    versions = catalogue.live_versions(encoder)
    if catalogue.active_model(encoder) is None and versions:
        current = max((v for v in versions if v != model_version), key=versions.get, default=None)
        if current is not None:
            catalogue.set_active_model(encoder, current, default_weights)
    old = sorted(v for v in versions if v != model_version)
    walker = Backfill(api, catalogue, send, None, batch=batch, rate=rate, settle_timeout=settle_timeout,
                      task=TASK_REINDEX_INSTANCE, task_kwargs={"encoder": encoder, "weights": weights},
                      model_version=model_version)
    report = ReindexReport(encoder, old, model_version, [], False, 0)

    def one_round() -> BackfillReport:
        items = catalogue.lacking(encoder, model_version)
        bar = progress(len(items)) if progress else None
        done = walker.run_instances(items, progress=bar)
        report.rounds.append(done)
        return done

    for _ in range(max_rounds):
        done = one_round()
        if not catalogue.lacking(encoder, model_version):
            break
    else:
        return report
    if done.failed or done.waiting:
        return report
    catalogue.set_active_model(encoder, model_version, weights)
    report.switched = True
    one_round()  # what the worker embedded with the old model between the last round and the switch
    if catalogue.lacking(encoder, model_version):
        return report  # an instance would lose its only vector: the old model's stay until a rerun
    for version in old:
        report.retired_vectors += store.retire_model(encoder, version)
    return report
