"""GLaM's quality classifier and the selection of web documents by its score (Du et al. 2021,
section 4; the selection rule is GPT-3's, Brown et al. 2020, appendix A).

Features are hashed word n-grams (scikit-learn's `HashingVectorizer`: stateless, so every
worker computes them alike), the model a logistic regression trained to tell documents of the
curated sources (label 1) from those of the web sources (label 0). A document's score s in
[0, 1] is its probability of being curated. Selection of web documents:

- `pareto`: keep when x > 1 - s, x drawn from numpy's Pareto(alpha) (a Lomax distribution:
  P(x > t) = (1 + t)^-alpha), so P(keep) = (2 - s)^-alpha: s = 1 always kept, s = 0 kept with
  2^-alpha (0.2% at alpha 9). The draw is the inverse CDF of a uniform fixed by a hash of the
  document's text and the seed: the same document gets the same decision on every worker and in
  every run;
- `threshold`: keep when s >= threshold;
- `none`: keep everything.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field

import numpy as np

from glam.config import QualityConfig, Selection

HISTOGRAM_BINS = 20


def vectorizer(cfg: QualityConfig):
    """Hashed unigrams..`ngram_max`-grams of lower-cased words, L2-normalised, float32."""
    from sklearn.feature_extraction.text import HashingVectorizer

    return HashingVectorizer(n_features=cfg.n_features, ngram_range=(1, cfg.ngram_max),
                             alternate_sign=False, norm="l2", dtype=np.float32)


@dataclass
class Classifier:
    """A trained linear quality classifier: weights [n_features] float32 and a bias, with the
    settings it was trained with and its held-out metrics."""

    weights: np.ndarray
    bias: float
    settings: dict
    metrics: dict = field(default_factory=dict)

    def scores(self, texts: list[str], cfg: QualityConfig) -> np.ndarray:
        """P(curated) per text, [len(texts)] float64 in [0, 1]."""
        logits = vectorizer(cfg).transform(texts) @ self.weights + self.bias
        return 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, weights=self.weights, bias=np.float64(self.bias),
                            meta=np.frombuffer(json.dumps(
                                {"settings": self.settings, "metrics": self.metrics}).encode(),
                                np.uint8))
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Classifier":
        with np.load(io.BytesIO(data)) as z:
            meta = json.loads(z["meta"].tobytes())
            return cls(z["weights"], float(z["bias"]), meta["settings"], meta["metrics"])

    @property
    def sha256(self) -> str:
        h = hashlib.sha256(self.weights.tobytes())
        h.update(np.float64(self.bias).tobytes())
        return h.hexdigest()


def train(curated: list[str], web: list[str], cfg: QualityConfig, seed: int) -> Classifier:
    """Fit on a seeded split of the two samples and evaluate on the held-out rest: ROC AUC,
    accuracy at 0.5, and the reliability curve (mean score and share curated per score bin).

    Raises:
      ValueError: fewer than 10 documents of a class after the hold-out (the message names it).
    """
    from sklearn.calibration import calibration_curve
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, roc_auc_score

    rng = np.random.default_rng(seed)
    texts = curated + web
    labels = np.asarray([1] * len(curated) + [0] * len(web))
    held_out = rng.random(len(texts)) < cfg.holdout_share
    for label, name in ((1, "curated"), (0, "web")):
        for part, mask in (("training", ~held_out), ("held-out", held_out)):
            n = int(np.sum(mask & (labels == label)))
            if n < 10:
                raise ValueError(f"only {n} {name} documents for the quality classifier's "
                                 f"{part} split; give the {name} sources more text or raise "
                                 "data.quality.train_docs.")
    features = vectorizer(cfg).transform(texts)
    model = LogisticRegression(C=cfg.regularization, max_iter=1000, random_state=seed)
    model.fit(features[~held_out], labels[~held_out])
    scores = model.predict_proba(features[held_out])[:, 1]
    truth = labels[held_out]
    share, mean_score = calibration_curve(truth, scores, n_bins=10, strategy="uniform")
    metrics = {"roc_auc": float(roc_auc_score(truth, scores)),
               "accuracy": float(accuracy_score(truth, scores >= 0.5)),
               "reliability": {"mean_score": mean_score.tolist(), "share_curated": share.tolist()},
               "train_documents": {"curated": int(np.sum(~held_out & (labels == 1))),
                                   "web": int(np.sum(~held_out & (labels == 0)))},
               "held_out_documents": {"curated": int(np.sum(held_out & (labels == 1))),
                                      "web": int(np.sum(held_out & (labels == 0)))}}
    return Classifier(model.coef_[0].astype(np.float32), float(model.intercept_[0]),
                      settings={"n_features": cfg.n_features, "ngram_max": cfg.ngram_max,
                                "regularization": cfg.regularization, "seed": seed},
                      metrics=metrics)


def keep_probability(score: np.ndarray, alpha: float) -> np.ndarray:
    """P(keep) under `pareto` selection: (2 - s)^-alpha."""
    return (2.0 - np.asarray(score, np.float64)) ** -alpha


def keep(scores: np.ndarray, uniforms: np.ndarray, cfg: QualityConfig) -> np.ndarray:
    """Which documents to keep, [n] bool, from their scores and their hash-fixed uniforms in
    [0, 1) (`selection=pareto`: the Lomax draw (1 - u)^(-1/alpha) - 1 against 1 - s)."""
    scores = np.asarray(scores, np.float64)
    if cfg.selection == Selection.pareto:
        draws = (1.0 - np.asarray(uniforms, np.float64)) ** (-1.0 / cfg.alpha) - 1.0
        return draws > 1.0 - scores
    if cfg.selection == Selection.threshold:
        return scores >= cfg.threshold
    return np.ones(len(scores), bool)


def histogram(scores: list[float]) -> list[int]:
    """Counts of `scores` in HISTOGRAM_BINS equal bins over [0, 1]."""
    counts, _ = np.histogram(np.asarray(scores, np.float64), bins=HISTOGRAM_BINS, range=(0, 1))
    return counts.tolist()


def label_report(labels: dict[str, dict], good_label: str) -> dict:
    """How the classifier and the selection treated documents of known labels.

    Args:
      labels: label -> {"documents", "kept", "score_sum", "histogram"} (HISTOGRAM_BINS counts of
        the classifier's scores), summed over a web source's files.
      good_label: the label of documents that should be kept (the world's "clean").

    Returns:
      {"by_label": label -> documents, kept_fraction, mean_score, scored_curated (share with
      score >= 0.5)} and, when `good_label` and another label occur, "good_label" and
      "selection" (precision: share of kept documents with the good label, against its
      `base_rate` among all; recall: share of good documents kept) and "classifier" (precision
      and recall of score >= 0.5, ROC AUC of good vs the rest from the binned scores, ties
      counted half).
    """
    half = HISTOGRAM_BINS // 2  # score >= 0.5 is exactly the upper half of the bins
    by_label = {label: {"documents": c["documents"],
                        "kept_fraction": c["kept"] / max(c["documents"], 1),
                        "mean_score": c["score_sum"] / max(c["documents"], 1),
                        "scored_curated": sum(c["histogram"][half:]) / max(c["documents"], 1)}
                for label, c in sorted(labels.items())}
    report: dict = {"by_label": by_label}
    good = labels.get(good_label)
    rest = [c for label, c in labels.items() if label != good_label]
    if good is None or not rest or not good["documents"]:
        return report
    hist_good = np.asarray(good["histogram"], np.float64)
    hist_rest = np.sum([c["histogram"] for c in rest], axis=0).astype(np.float64)
    total = good["documents"] + sum(c["documents"] for c in rest)
    kept = good["kept"] + sum(c["kept"] for c in rest)
    above_good, above_rest = hist_good[half:].sum(), hist_rest[half:].sum()
    # P(score of a good document > score of another), by bins: lower bins of the rest below.
    below_rest = np.concatenate([[0.0], np.cumsum(hist_rest)[:-1]])
    auc = float((hist_good * (below_rest + hist_rest / 2)).sum()
                / (hist_good.sum() * hist_rest.sum()))
    report.update({
        "good_label": good_label,
        "selection": {"precision": good["kept"] / max(kept, 1),
                      "recall": good["kept"] / good["documents"],
                      "base_rate": good["documents"] / total},
        "classifier": {"precision": float(above_good / max(above_good + above_rest, 1)),
                       "recall": float(above_good / good["documents"]), "roc_auc_binned": auc}})
    return report
