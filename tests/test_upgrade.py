"""An updated Lookalike over an archive indexed with the previous shipped model: the archive stays searchable on
that model until ``lookalike reindex --encoder xr`` moves it to the shipped one (lookalike.index.upgrade)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lookalike.encoders import load_encoder
from lookalike.encoders import shipped as shipped_module
from lookalike.encoders.base import file_sha256
from lookalike.encoders.shipped import previous_checkpoint, shipped_version
from lookalike.index.search import similar_studies
from lookalike.index.store import IndexStore
from lookalike.index.upgrade import keep_archive_models
from lookalike.plugin import rest
from lookalike.worker.pipeline import InstanceIndexer, Request
from lookalike.worker.reindex import reindex
from tests.support import record, unit

@dataclasses.dataclass(frozen=True)
class EarlierRelease:
    """An earlier release's X-ray model version and the folder its checkpoint is kept in."""

    version: str
    folder: Path

    @property
    def checkpoint(self) -> Path:
        return self.folder / f"{self.version}.pt"


@pytest.fixture(scope="module")
def earlier_release(tmp_path_factory) -> EarlierRelease:
    """An earlier release's X-ray checkpoint kept in ``weights/previous``, as a release that replaces ``xr.pt``
    keeps it: the shipped file with one weight changed (another model version, the same architecture), in a
    folder of its own that the shipped-checkpoint module is pointed to."""
    import torch

    folder = tmp_path_factory.mktemp("weights") / "previous"
    folder.mkdir()
    checkpoint = torch.load(shipped_module.shipped_path("xr"), map_location="cpu", weights_only=True)
    name, tensor = next((k, v) for k, v in checkpoint["state_dict"].items() if v.is_floating_point())
    checkpoint["state_dict"][name] = tensor + 1e-3
    staged = folder / "staged.pt"
    torch.save(checkpoint, staged)
    release = EarlierRelease(f"xr-{checkpoint['arch']['tag']}-{file_sha256(staged)[:8]}", folder)
    staged.rename(release.checkpoint)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(shipped_module, "PREVIOUS_DIR", folder)
        yield release


def xr_record(i: int, study: int | None = None):
    """An X-ray instance's catalogue record (``record`` makes ultrasound ones)."""
    return dataclasses.replace(record(i, study), encoder="xr", modality="DX", sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1")


def _store(tmp_path: Path, version: str | None, n: int = 9) -> IndexStore:
    """An index whose ``n`` US instances (3 per study) have vectors of ``version`` (none: an empty index), alike
    enough that every study answers every other above the model's similarity floor."""
    store = IndexStore(tmp_path / "index")
    if version is not None:
        rng = np.random.default_rng(0)
        vectors = unit(rng.standard_normal(64) + 0.2 * rng.standard_normal((n, 64)))
        store.add_many([dataclasses.replace(xr_record(i), model_version=version) for i in range(n)], vectors)
    return store


def _planned_weights(store: IndexStore) -> str:
    """The checkpoint the worker would embed a newly stored US instance with ("" : the settings' one)."""
    return InstanceIndexer(None, store).plan([Request("inst-new", "series-new", "study-new")])[0].weights["xr"]


def test_every_kept_checkpoint_loads_with_the_model_version_it_is_named_by(earlier_release: EarlierRelease) -> None:
    kept = sorted(earlier_release.folder.glob("*.pt"))
    assert earlier_release.checkpoint in kept
    for path in kept:
        assert load_encoder(path.stem.split("-", 1)[0], path).model_version == path.stem
        assert previous_checkpoint(path.stem.split("-", 1)[0], path.stem) == path


def test_shipped_version_is_known_without_torch_and_is_what_the_shipped_file_loads_as(earlier_release: EarlierRelease) -> None:
    for name in ("us", "xr"):
        assert shipped_version(name) == load_encoder(name).model_version
    assert shipped_version("xr") != earlier_release.version


def test_an_archive_of_the_previous_shipped_model_stays_on_it(tmp_path: Path, earlier_release: EarlierRelease) -> None:
    store = _store(tmp_path, earlier_release.version)
    assert _planned_weights(store) == ""  # before: the shipped file, another model than the archive's

    kept = keep_archive_models(store.catalogue, {})

    checkpoint = str(earlier_release.checkpoint)
    assert kept == {"xr": (earlier_release.version, checkpoint)}
    assert store.catalogue.active_model("xr") == (earlier_release.version, checkpoint)
    assert store.catalogue.active_model("us") is None  # no ultrasound vectors: nothing to keep
    assert _planned_weights(store) == checkpoint
    assert load_encoder("xr", _planned_weights(store)).model_version == earlier_release.version
    assert keep_archive_models(store.catalogue, {}) == {}  # once: the next start finds it recorded


def test_lookups_of_a_new_study_search_the_archive_it_stays_on(tmp_path: Path, earlier_release: EarlierRelease) -> None:
    store = _store(tmp_path, earlier_release.version)
    keep_archive_models(store.catalogue, {})
    # A study stored after the update, embedded with the checkpoint the worker planned (the kept one), lies near
    # study 1; a stray vector of the shipped model (a worker of the old code) must not be searched.
    near = store.catalogue.rows_for_study("study-1", with_vectors=True)[0].vector
    store.add_many([dataclasses.replace(xr_record(100, study=100), model_version=earlier_release.version),
                    dataclasses.replace(xr_record(101, study=100), model_version=shipped_version("xr"))],
                   unit(np.stack([near, np.ones(64)])))
    answer = similar_studies(store, "study-100", limit=5)
    assert answer and answer[0].orthanc_study_id == "study-1"
    assert {m.model_version for m in answer} == {earlier_release.version}


def test_a_fresh_index_uses_the_shipped_model(tmp_path: Path, earlier_release: EarlierRelease) -> None:
    store = _store(tmp_path, None)
    assert keep_archive_models(store.catalogue, {}) == {}
    assert store.catalogue.active_model("xr") is None
    assert load_encoder("xr", _planned_weights(store) or None).model_version == shipped_version("xr")
    assert rest.status(store.catalogue, lambda: 0)[1]["models"] == []


def test_an_archive_of_the_shipped_model_is_left_as_it_is(tmp_path: Path, earlier_release: EarlierRelease) -> None:
    store = _store(tmp_path, shipped_version("xr"))
    assert keep_archive_models(store.catalogue, {}) == {}
    assert store.catalogue.active_model("xr") is None
    models = rest.status(store.catalogue, lambda: 0)[1]["models"]
    assert [(m["encoder"], m["newer_shipped_model"]) for m in models] == [("xr", False)]


def test_a_recorded_shipped_path_of_an_older_version_moves_to_its_kept_checkpoint(tmp_path: Path, earlier_release: EarlierRelease) -> None:
    store = _store(tmp_path, earlier_release.version)
    store.catalogue.set_active_model("xr", earlier_release.version, "")  # what `reindex` recorded before an update
    keep_archive_models(store.catalogue, {})
    assert store.catalogue.active_model("xr") == (earlier_release.version, str(earlier_release.checkpoint))


def test_a_kept_checkpoint_recorded_at_a_path_that_is_gone_is_found_again(tmp_path: Path, earlier_release: EarlierRelease) -> None:
    store = _store(tmp_path, earlier_release.version)
    moved = tmp_path / "old-install" / f"{earlier_release.version}.pt"
    moved.parent.mkdir()
    shutil.copyfile(earlier_release.checkpoint, moved)
    store.catalogue.set_active_model("xr", earlier_release.version, str(moved))
    assert keep_archive_models(store.catalogue, {}) == {}  # there: nothing to do
    moved.unlink()  # the package was installed elsewhere
    keep_archive_models(store.catalogue, {})
    assert store.catalogue.active_model("xr") == (earlier_release.version, str(earlier_release.checkpoint))


def test_a_site_checkpoint_in_the_settings_is_the_sites_to_replace(tmp_path: Path, earlier_release: EarlierRelease) -> None:
    store = _store(tmp_path, earlier_release.version)
    assert keep_archive_models(store.catalogue, {"xr": "/site/xr.pt"}) == {}
    assert store.catalogue.active_model("xr") is None


def test_an_older_model_without_a_kept_checkpoint_is_not_recorded(tmp_path: Path, earlier_release: EarlierRelease) -> None:
    store = _store(tmp_path, "xr-vit-1-03f70559")  # an earlier release's, not kept
    assert keep_archive_models(store.catalogue, {}) == {}
    assert store.catalogue.active_model("xr") is None


def test_a_switch_made_meanwhile_wins(tmp_path: Path, earlier_release: EarlierRelease) -> None:
    store = _store(tmp_path, earlier_release.version)
    store.catalogue.set_active_model("xr", "xr-other-1-00000000", "/elsewhere.pt")
    assert not store.catalogue.replace_active_model("xr", None, earlier_release.version, "kept.pt")
    assert store.catalogue.active_model("xr") == ("xr-other-1-00000000", "/elsewhere.pt")
    assert store.catalogue.replace_active_model("xr", ("xr-other-1-00000000", "/elsewhere.pt"), earlier_release.version, "k")
    assert store.catalogue.active_model("xr") == (earlier_release.version, "k")


def test_status_says_a_newer_shipped_model_waits_and_the_command(tmp_path: Path, earlier_release: EarlierRelease) -> None:
    store = _store(tmp_path, earlier_release.version)
    keep_archive_models(store.catalogue, {})
    (us,) = rest.status(store.catalogue, lambda: 0)[1]["models"]
    assert us["active_model"] == earlier_release.version and us["shipped_model"] == shipped_version("xr")
    assert us["newer_shipped_model"] is True
    assert us["action"].startswith("lookalike reindex --encoder xr")
    (site,) = rest.status(store.catalogue, lambda: 0, weights={"xr": "/site/xr.pt"})[1]["models"]
    assert site["newer_shipped_model"] is False and "action" not in site


def test_reindex_to_the_shipped_model_moves_the_archive_without_a_gap(tmp_path: Path, earlier_release: EarlierRelease) -> None:
    """``lookalike reindex --encoder xr`` (no --model: weights "") over a catalogue nothing has touched since the
    update: lookups stay on the archive's model until every instance has its shipped vector, new instances are
    embedded with the archive's model meanwhile, then one switch to the shipped model recorded as ""."""
    store = _store(tmp_path, earlier_release.version)
    new_model = shipped_version("xr")
    seen: list[tuple[str, set[str]]] = []  # (checkpoint a re-index task was planned with, versions a lookup used)

    def send(name: str, args: list, kwargs: dict) -> None:
        instance, series, study = args
        job = InstanceIndexer(None, store).plan([Request(instance, series, study, model=("xr", kwargs["weights"]))])[0]
        version = load_encoder("xr", job.weights["xr"] or None).model_version
        row = next(r for r in store.catalogue.rows_for_study(study, with_vectors=True) if r.orthanc_instance_id
                   == instance)
        store.add_many([dataclasses.replace(row.record, model_version=version)], row.vector[None, :])
        seen.append((job.weights["xr"], {m.model_version for m in similar_studies(store, "study-0", limit=5)}))
        seen.append(("new instance", {load_encoder("xr", _planned_weights(store) or None).model_version}))

    report = reindex(None, store, send, "xr", new_model, "", default_model=new_model, batch=4, rate=1e6,
                     settle_timeout=5)

    assert report.switched and report.old_models == [earlier_release.version] and report.retired_vectors == 9
    assert len(seen) == 18 and all(weights == "" for weights, _ in seen[::2])
    # Until the switch, lookups answer from the archive's model alone, and new instances are embedded with it.
    assert all(versions == {earlier_release.version} for _, versions in seen)
    assert store.catalogue.active_model("xr") == (new_model, "")
    assert store.catalogue.live_versions("xr") == {new_model: 9}
    assert {m.model_version for m in similar_studies(store, "study-0", limit=5)} == {new_model}


def test_reindex_without_a_model_means_the_shipped_file(tmp_path: Path, capsys: pytest.CaptureFixture, earlier_release: EarlierRelease) -> None:
    """``lookalike reindex --encoder xr`` names the shipped model: over an index of the previous one it records the
    kept checkpoint before it starts; over an index of the shipped one it is refused (exit 2), nothing queued."""
    from lookalike.cli import main

    config = tmp_path / "lookalike.json"
    config.write_text(json.dumps({"index_dir": str(tmp_path / "index"), "redis_url": "redis://127.0.0.1:1/0"}))
    _store(tmp_path, shipped_version("xr")).close()
    assert main(["--config", str(config), "reindex", "--encoder", "xr"]) == 2
    assert f"{shipped_version('xr')} is already the active xr model" in capsys.readouterr().err


def test_an_embedding_host_installed_elsewhere_opens_its_own_copy_of_a_kept_checkpoint(earlier_release: EarlierRelease) -> None:
    from lookalike.encoders.shipped import local_checkpoint

    kept = str(earlier_release.checkpoint)
    assert local_checkpoint(f"/opt/other-install/weights/previous/{earlier_release.version}.pt") == kept
    assert local_checkpoint(kept) == kept
    assert local_checkpoint("/site/xr.pt") == "/site/xr.pt" and local_checkpoint("") == ""
