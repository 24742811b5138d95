"""GLaM's quality filter: the classifier, the Pareto selection and the filter stage of
glam-data prepare."""

import json
from pathlib import Path

import numpy as np
import pytest

from glam.config import ConfigError, DataConfig, QualityConfig, SourceConfig, TokenizerConfig
from glam.data import quality
from glam.data.prepare import prepare
from glam.data.shards import unit_hash
from glam.data.sources import DataError
from glam.data.text import load_manifest
from glam.resolve import load_raw

_SUBJECTS = "the old teacher|a quiet child|every river|the bright market|this strange bridge".split("|")
_VERBS = "remembers|follows|paints|crosses|carries|watches|opens".split("|")
_OBJECTS = "a green garden|the heavy letter|some cold winter|the gentle song|that dark tower".split("|")
_JUNK = ("click here subscribe now free offer buy cheap best price login cookie accept "
         "share tweet like follow sale discount limited deal").split()


def _clean(rng, n_sentences):
    return " ".join(f"{rng.choice(_SUBJECTS).capitalize()} {rng.choice(_VERBS)} "
                    f"{rng.choice(_OBJECTS)}." for _ in range(n_sentences))


def _junk(rng, n_words):
    words = rng.choice(_JUNK + [w for s in _SUBJECTS for w in s.split()], n_words)
    return " ".join(words)


def _corpus(tmp_path, n=400, seed=0):
    """curated: clean prose; web: half clean prose, half junk (labels kept for measuring)."""
    rng = np.random.default_rng(seed)
    curated = [_clean(rng, int(rng.integers(3, 8))) for _ in range(n)]
    web, labels = [], []
    for i in range(n):
        good = i % 2 == 0
        web.append(_clean(rng, int(rng.integers(3, 8))) if good else
                   _junk(rng, int(rng.integers(15, 40))))
        labels.append(good)
    kinds = {"curated": ["good"] * n, "web": ["good" if g else "junk" for g in labels]}
    for name, docs in (("curated", curated), ("web", web)):
        path = tmp_path / "raw" / f"{name}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"text": d, "kind": k}) + "\n"
                                for d, k in zip(docs, kinds[name])))
    return curated, web, np.asarray(labels)


def _config(tmp_path, selection="pareto", **quality_settings) -> DataConfig:
    d = DataConfig(
        kind="text",
        sources=[SourceConfig(name="wiki", paths=[str(tmp_path / "raw" / "curated.jsonl")],
                              quality="curated", weight=0.5, val_share=0.1),
                 SourceConfig(name="web", paths=[str(tmp_path / "raw" / "web.jsonl")],
                              quality="web", label_field="kind", weight=0.5, val_share=0.1)],
        prepared_dir=str(tmp_path / f"prepared-{selection}"),
        tokenizer=TokenizerConfig(vocab_size=300, sample_chars=100_000),
        quality=QualityConfig(selection=selection, n_features=2**14, train_docs=300,
                              good_label="good", **quality_settings))
    d.engine.workers = 1
    d.check()
    return d


def test_the_classifier_recovers_planted_quality(tmp_path):
    """Trained on curated vs all of web (it never sees which web pages are junk), it ranks the
    junk pages below the clean ones: ROC AUC above 0.95."""
    curated, web, clean = _corpus(tmp_path)
    cfg = QualityConfig(n_features=2**14, train_docs=300)
    clf = quality.train(curated[:300], web[:300], cfg, seed=0)
    assert 0.5 < clf.metrics["roc_auc"] <= 1.0  # curated vs web: half of web is clean
    assert len(clf.metrics["reliability"]["mean_score"]) >= 2
    from sklearn.metrics import roc_auc_score

    scores = clf.scores(web[300:], cfg)
    assert roc_auc_score(clean[300:], scores) > 0.95
    again = quality.Classifier.from_bytes(clf.to_bytes())
    np.testing.assert_allclose(again.scores(web[300:], cfg), scores)
    assert again.sha256 == clf.sha256


def test_pareto_keeps_the_expected_fraction_and_the_same_documents_every_time():
    cfg = QualityConfig(selection="pareto", alpha=9.0)
    texts = [f"document {i}" for i in range(40_000)]
    uniforms = np.asarray([unit_hash(0, "pareto", t) for t in texts])
    for score in (0.0, 0.5, 0.8, 1.0):
        kept = quality.keep(np.full(len(texts), score), uniforms, cfg)
        expected = float(quality.keep_probability(score, 9.0))  # (2 - s)^-9
        assert abs(kept.mean() - expected) < 4 * np.sqrt(expected * (1 - expected) / len(texts)) \
            + 1e-9, score
    scores = np.linspace(0, 1, len(texts))
    a = quality.keep(scores, uniforms, cfg)
    b = quality.keep(scores, np.asarray([unit_hash(0, "pareto", t) for t in texts]), cfg)
    assert (a == b).all()  # a pure function of (seed, text, score)
    threshold = quality.keep(scores, uniforms, QualityConfig(selection="threshold", threshold=0.7))
    assert (threshold == (scores >= 0.7)).all()


def test_the_filter_stage_drops_junk_and_is_recorded(tmp_path):
    _, web, clean = _corpus(tmp_path)
    filtered = prepare(_config(tmp_path), progress=False)
    unfiltered = prepare(_config(tmp_path, "none"), progress=False)
    assert filtered["fingerprint"] != unfiltered["fingerprint"]
    q = filtered["sources"]["web"]["quality"]
    assert q["kept"] + q["dropped"] == len(web)
    out = Path(_config(tmp_path).prepared_dir)
    clf = quality.Classifier.from_bytes((out / filtered["quality"]["classifier"]).read_bytes())
    scores = clf.scores(web, _config(tmp_path).quality)
    expected = quality.keep_probability(scores, 9.0)  # P(keep) = (2 - s)^-9 per page
    assert abs(q["kept"] - expected.sum()) < 4 * np.sqrt(expected.sum()) + 2
    assert expected[clean].mean() > 10 * expected[~clean].mean()  # clean pages survive
    assert sum(q["histogram_kept"]) == q["kept"] and sum(q["histogram_dropped"]) == q["dropped"]
    # The labels (never features) measure the filter: per label and for the good one.
    labels = q["labels"]
    assert {k: v["documents"] for k, v in labels["by_label"].items()} == {
        "good": int(clean.sum()), "junk": int((~clean).sum())}
    assert labels["by_label"]["good"]["mean_score"] == pytest.approx(scores[clean].mean(), abs=1e-6)
    assert labels["selection"]["base_rate"] == pytest.approx(clean.mean())
    assert labels["selection"]["precision"] > 0.9 > clean.mean()
    assert labels["selection"]["recall"] == pytest.approx(
        labels["by_label"]["good"]["kept_fraction"])
    assert labels["classifier"]["roc_auc_binned"] > 0.95
    assert "quality" not in filtered["sources"]["wiki"]  # curated text is not filtered
    assert filtered["quality"]["metrics"]["roc_auc"] > 0.5
    samples = [json.loads(x) for x in
               (out / filtered["quality"]["samples"]).read_text().splitlines()]
    junk = set(_JUNK)
    kept = [s["text"] for s in samples if s["decision"] == "kept"]
    dropped = [s["text"] for s in samples if s["decision"] == "dropped"]
    assert kept and dropped and len(dropped) == 20
    assert sum(bool(junk & set(t.split())) for t in kept) <= len(kept) // 4
    w = filtered["sources"]["web"]["splits"]
    u = unfiltered["sources"]["web"]["splits"]
    assert w["train"]["documents"] + w["val"]["documents"] == q["kept"]
    assert u["train"]["documents"] + u["val"]["documents"] == len(web)


def test_the_label_report_counts_precision_recall_and_auc():
    """Hand-made counts: 100 good pages scored in the top bin (40 kept), 300 others split
    between the bottom bin (200, 2 kept) and the top one (100, 10 kept)."""
    top, bottom = [0] * 19 + [1], [1] + [0] * 19
    labels = {"good": {"documents": 100, "kept": 40, "score_sum": 97.5,
                       "histogram": [100 * x for x in top]},
              "salad": {"documents": 200, "kept": 2, "score_sum": 5.0,
                        "histogram": [200 * x for x in bottom]},
              "dupes": {"documents": 100, "kept": 10, "score_sum": 97.0,
                        "histogram": [100 * x for x in top]}}
    report = quality.label_report(labels, "good")
    assert report["selection"] == pytest.approx({"precision": 40 / 52, "recall": 0.4,
                                                 "base_rate": 0.25})
    # above 0.5: 100 good and 100 dupes; AUC: beats all 200 salad, ties the 100 dupes (half)
    assert report["classifier"] == pytest.approx({"precision": 0.5, "recall": 1.0,
                                                  "roc_auc_binned": (200 + 50) / 300})
    assert report["by_label"]["salad"] == pytest.approx(
        {"documents": 200, "kept_fraction": 0.01, "mean_score": 0.025, "scored_curated": 0.0})
    assert "selection" not in quality.label_report(labels, "missing")


def test_one_and_two_workers_keep_the_same_documents(tmp_path):
    _corpus(tmp_path)
    one = _config(tmp_path)
    two = _config(tmp_path)
    two.prepared_dir = str(tmp_path / "two")
    two.engine.workers = 2
    a, b = prepare(one, progress=False), prepare(two, progress=False)
    assert a["fingerprint"] == b["fingerprint"] and a["sources"] == b["sources"]


def test_bad_quality_settings_are_refused_before_work(tmp_path):
    with pytest.raises(ConfigError, match="data.quality.alpha: must be > 0"):
        load_raw(["data=pydocs", "data.quality.alpha=0"])
    with pytest.raises(ConfigError, match="needs a source with quality: curated"):
        load_raw(["data=pydocs", "data.quality.selection=pareto",
                  "data.sources.1.quality=web"])
    with pytest.raises(ConfigError, match="needs a source with quality: web"):
        load_raw(["data=pydocs", "data.quality.selection=threshold",
                  "data.sources.0.quality=curated"])
    _corpus(tmp_path, n=12)
    with pytest.raises(DataError, match="data.sources: only .* documents for the quality"):
        prepare(_config(tmp_path), progress=False)


def test_the_world_as_wiki_books_and_web_with_low_quality_pages(tmp_path):
    """world_web holds each low-quality kind in its configured share; a classifier trained on
    the text alone (curated wiki + books vs web) scores word salad and boilerplate far below
    the clean pages."""
    from glam.data import world_text

    overrides = ["data=world_quality", f"data.prepared_dir={tmp_path}",
                 "data.world_sources.wiki_documents=600", "data.world_sources.books_documents=300",
                 "data.world_sources.web_documents=1500", "data.n_entities=100"]
    d = load_raw(overrides).data
    with pytest.raises(ConfigError, match="data.qa_entity_fraction"):  # its answers would leak
        world_text.documents(load_raw([*overrides, "data.qa_entity_fraction=0"]).data,
                             "world_conversations")
    rows = {}
    for kind in world_text.KINDS:
        paths = world_text.export(kind, tmp_path / "raw", d)
        assert world_text.export(kind, tmp_path / "raw", d) == paths  # kept, not rewritten
        rows[kind] = [json.loads(x) for p in paths for x in Path(p).read_text().splitlines()]
    web = rows["world_web"]
    kinds = np.asarray([r["kind"] for r in web])
    assert len(web) == 1500 and {r["kind"] for r in rows["world_wiki"]} == {"clean"}
    for kind in world_text.LOW_QUALITY:
        share = getattr(d.world_sources, kind)
        assert abs(np.mean(kinds == kind) - share) < 0.04, kind
    assert not any("wrong_facts" in r["text"] or "word_salad" in r["text"] for r in web)
    cfg = QualityConfig(n_features=2**16, train_docs=600)
    curated = [r["text"] for r in rows["world_wiki"] + rows["world_books"]]
    clf = quality.train(curated, [r["text"] for r in web[:900]], cfg, seed=0)
    scores = clf.scores([r["text"] for r in web[900:]], cfg)
    held = kinds[900:]
    clean = scores[held == "clean"].mean()
    for kind in ("word_salad", "boilerplate"):
        assert scores[held == kind].mean() < clean / 3, kind


@pytest.mark.slow
def test_a_run_on_the_world_rendered_as_text_is_evaluated_on_the_worlds_tasks(tmp_path):
    """Trained on world_wiki/books/web through SentencePiece and grain, a run is scored on the
    world's few-shot tasks and logs each source's validation loss."""
    from mlflow.tracking import MlflowClient

    from glam.resolve import load
    from glam.trainer import run

    overrides = ["data=world_quality", f"data.prepared_dir={tmp_path / 'prepared'}",
                 "data.world_sources.wiki_documents=600", "data.world_sources.books_documents=300",
                 "data.world_sources.web_documents=900", "data.n_entities=100",
                 "data.world_sources.conversations_documents=300",
                 "data.tokenizer.vocab_size=400", "data.engine.workers=1"]
    prepare(load_raw(overrides).data, progress=False)
    with pytest.raises(ConfigError, match="differing: data.n_entities"):  # another world
        load_manifest(load_raw([*overrides, "data.n_entities=101"]).data)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    final = run(load([*overrides, "model=tiny_moe", "train.steps=6", "train.batch_size=4",
                      "train.progress=false", "train.eval_batches=1", "checkpoint.every=0",
                      "eval.max_examples=4", "eval.shots=[0]", f"logger.tracking_uri={uri}"]),
                tmp_path / "run")
    metrics = MlflowClient(uri).get_run(final["run_id"]).data.metrics
    assert {"eval/world_qa/0shot", "eval/world_facts/0shot", "val_loss/wiki",
            "val_loss/books", "val_loss/conversations", "val_loss/web"} <= metrics.keys()
    # the held-out text a filtered and an unfiltered run share: every source but the web
    clean = {"wiki": 0.2, "books": 0.15, "conversations": 0.2}
    assert metrics["val_loss_clean"] == pytest.approx(
        sum(metrics[f"val_loss/{k}"] * w for k, w in clean.items()) / sum(clean.values()))
