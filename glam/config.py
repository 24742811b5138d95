"""The configuration schema: typed sections Hydra composes into, and the checks of each section.

This module is the schema alone and imports nothing else from `glam`. Hydra merges the YAML tree
(`conf/`, studies in `sweeps/`) into `Config`, so an unknown key, a wrong type or a choice outside
its Enum fails at composition with the key named. Each section's `check()` runs the checks that
need only that section (positive sizes, `top_k <= n_experts`, ...). Values that depend on other
sections or on the machine (vocabulary size, expert width, concrete dispatch, group size) are
filled by `glam.resolve`, which returns a frozen `ResolvedConfig`; code that trains, counts or
plans uses that.

Every field carries a one-line doc (`dataclasses.fields(...)[i].metadata["doc"]`) with its unit.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Optional


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


def doc(default: Any, text: str, factory: bool = False) -> Any:
    """A dataclass field with its one-line documentation (`metadata["doc"]`)."""
    if factory:
        return field(default_factory=default, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


# -- choices -----------------------------------------------------------------------------------
class FFNKind(StrEnum):
    geglu = "geglu"
    gelu = "gelu"


class DType(StrEnum):
    float32 = "float32"
    bfloat16 = "bfloat16"


class SecondExpertPolicy(StrEnum):
    all = "all"
    random = "random"
    sampling = "sampling"


class GateNorm(StrEnum):
    before = "before"
    after = "after"


class Balance(StrEnum):
    """How the router's load is balanced (`glam.model.routing`)."""

    aux = "aux"
    bias = "bias"
    both = "both"


class Dispatch(StrEnum):
    """How tokens reach their experts (`glam.model.moe`). `auto` is resolved per backend."""

    auto = "auto"
    gather = "gather"
    einsum = "einsum"
    dropless = "dropless"


class DataKind(StrEnum):
    world = "world"
    text = "text"


class TokenizerModel(StrEnum):
    unigram = "unigram"
    bpe = "bpe"


class Malformed(StrEnum):
    stop = "stop"
    skip = "skip"


class TextUnit(StrEnum):
    file = "file"
    line = "line"


class QualityRole(StrEnum):
    curated = "curated"
    web = "web"


class Selection(StrEnum):
    none = "none"
    pareto = "pareto"
    threshold = "threshold"


class BuiltinText(StrEnum):
    reference = "reference"
    docstrings = "docstrings"
    world_wiki = "world_wiki"
    world_books = "world_books"
    world_conversations = "world_conversations"
    world_web = "world_web"


class OptimizerName(StrEnum):
    adamw = "adamw"
    adafactor = "adafactor"


class ScheduleName(StrEnum):
    glam = "glam"
    cosine = "cosine"
    wsd = "wsd"


class Resume(StrEnum):
    auto = "auto"
    never = "never"


class DistributedInit(StrEnum):
    auto = "auto"
    always = "always"
    never = "never"


class Placement(StrEnum):
    glam = "glam"
    matched = "matched"


class TaskKind(StrEnum):
    nlg = "nlg"
    nlu = "nlu"


# -- checks ------------------------------------------------------------------------------------
def check(ok: bool, field_name: str, message: str) -> None:
    """Raise ConfigError(`field_name: message`) unless `ok`."""
    if not ok:
        raise ConfigError(f"{field_name}: {message}")


def _positive(obj: Any, prefix: str, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None:
            check(value > 0, f"{prefix}.{name}", f"must be positive, got {value}.")


def _non_negative(obj: Any, prefix: str, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(obj, name)
        check(value >= 0, f"{prefix}.{name}", f"must be >= 0, got {value}.")


def _in_unit_interval(obj: Any, prefix: str, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(obj, name)
        check(0 <= value <= 1, f"{prefix}.{name}", f"must be in [0, 1], got {value}.")


# A name that becomes part of an MLflow metric key: dot-separated words, no empty or dot-only part.
METRIC_NAME = r"[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*"
TRACKING_SCHEMES = ("sqlite", "http", "https", "file", "databricks", "postgresql", "mysql",
                    "mssql")


class Section:
    """Base of every section. A resolved config freezes its sections (`freeze`): assigning to a
    field of one then raises `dataclasses.FrozenInstanceError`."""

    _frozen = False

    def __setattr__(self, name: str, value: Any) -> None:
        if self._frozen:
            raise dataclasses.FrozenInstanceError(
                f"cannot assign {type(self).__name__}.{name}: a resolved config is frozen; "
                "change the raw config and resolve it again.")
        object.__setattr__(self, name, value)

    def check(self, prefix: str) -> None:
        """Checks that need only this section; raises ConfigError naming `prefix.field`."""


def freeze(section: Section) -> None:
    """Freeze `section` and its sub-sections in place; lists become tuples."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if isinstance(value, Section):
            freeze(value)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, Section):
                    freeze(item)
            object.__setattr__(section, f.name, tuple(value))
    object.__setattr__(section, "_frozen", True)


# -- sections ----------------------------------------------------------------------------------
@dataclass
class RouterConfig(Section):
    """How tokens are routed to experts (GShard top-k gating); see `glam.model.routing`."""

    capacity_factor: float = doc(1.25, "expert slots per routed assignment (GShard eq. 2), > 0")
    capacity_multiple: int = doc(4, "capacity C rounded up to a multiple of this (slots)")
    group_size: Optional[int] = doc(None, "tokens per routing group S; null: one sequence "
                                          "(model.seq_len), filled by resolve")
    second_expert_policy: SecondExpertPolicy = doc(SecondExpertPolicy.all,
                                                   "which second choices are kept (GShard)")
    gate_norm: GateNorm = doc(GateNorm.before, "normalise top-k gates before or after dropping")
    jitter: float = doc(0.0, "multiplicative router-input noise in training, in [0, 1)")
    aux_loss_weight: float = doc(0.01, "weight of the load-balancing loss (1 at balance)")
    z_loss_weight: float = doc(0.0, "weight of the router z-loss (ST-MoE)")
    dispatch: Dispatch = doc(Dispatch.auto, "gather | einsum | dropless; auto: dropless on "
                                            "GPU/TPU, gather on CPU, fixed by resolve")
    balance: Balance = doc(Balance.aux, "aux: the load-balancing loss (GShard); bias: a "
                                        "per-expert selection bias and no aux loss (DeepSeek-V3, "
                                        "auxiliary-loss-free); both")
    bias_rate: float = doc(1e-3, "bias balancing: each step every expert's bias moves this much "
                                 "toward balance (sign rule; DeepSeek-V3: 0.001)")

    def check(self, prefix: str) -> None:
        check(self.capacity_factor > 0, f"{prefix}.capacity_factor",
              f"must be positive, got {self.capacity_factor}.")
        _positive(self, prefix, ("capacity_multiple", "group_size"))
        _non_negative(self, prefix, ("aux_loss_weight", "z_loss_weight"))
        _positive(self, prefix, ("bias_rate",))
        check(0 <= self.jitter < 1, f"{prefix}.jitter", f"must be in [0, 1), got {self.jitter}.")


@dataclass
class ModelConfig(Section):
    """Shape of a GLaM decoder (GLaM, Du et al. 2021, section 2). `n_experts = 0` is the dense model."""

    name: str = doc("model", "preset name, used in run names")
    vocab_size: Optional[int] = doc(None, "token ids V; null: the data's tokenizer, filled by "
                                          "resolve")
    seq_len: int = doc(64, "training context T (tokens)")
    d_model: int = doc(64, "model width M")
    n_layers: int = doc(2, "Transformer blocks")
    n_heads: int = doc(4, "attention heads N")
    d_head: Optional[int] = doc(None, "head width D; null: d_model / n_heads")
    attn_width: Optional[int] = doc(None, "N x D, stated to check it; null: not checked")
    d_ff: int = doc(256, "dense FFN hidden width F")
    ffn_kind: FFNKind = doc(FFNKind.geglu, "dense FFN: geglu (3 matrices) or gelu (2)")
    n_experts: int = doc(0, "experts E per MoE layer at granularity 1; 0: dense model")
    expert_d_ff: Optional[int] = doc(None, "expert hidden width at granularity 1 (each of the "
                                           "E x G experts is expert_d_ff / G wide); null: from "
                                           "plan.placement, filled by resolve")
    top_k: int = doc(2, "experts K each token is sent to (at granularity 1)")
    granularity: int = doc(1, "G: each expert split into G experts G times narrower, routed "
                              "top_k x G of n_experts x G (Krajewski et al. 2024); 1: GLaM")
    shared_experts: int = doc(0, "always-on experts beside the routed ones, each as wide as a "
                                 "granularity-1 expert (DeepSeekMoE); 0: GLaM")
    expert_kind: FFNKind = doc(FFNKind.gelu, "routed and shared experts: gelu (2 matrices, "
                                             "GLaM) or geglu (3, the dense FFN's form; sparse "
                                             "upcycling needs the dense FFN's form)")
    moe_every: int = doc(2, "an MoE layer every this many layers")
    moe_offset: int = doc(0, "layer i is MoE when i % moe_every == moe_offset")
    tie_embeddings: bool = doc(True, "share input and output embeddings")
    rel_pos_buckets: int = doc(32, "T5 relative-position buckets")
    rel_pos_max_distance: int = doc(128, "distance (tokens) beyond which buckets saturate")
    dtype: DType = doc(DType.float32, "activation dtype; parameters and router stay float32")
    output_z_loss_weight: float = doc(0.0, "weight of the output z-loss, mean over tokens of "
                                           "logsumexp(logits)^2 (GLaM reference code: 1e-4)")
    router: RouterConfig = doc(RouterConfig, "MoE routing", factory=True)

    @property
    def head_dim(self) -> int:
        return self.d_head if self.d_head is not None else self.d_model // self.n_heads

    @property
    def attention_width(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def expert_hidden(self) -> int:
        """H, each routed expert's hidden width: `expert_d_ff` (d_ff until resolution fills it)
        divided by the granularity G and rounded."""
        width = self.expert_d_ff if self.expert_d_ff is not None else self.d_ff
        return max(1, round(width / self.granularity))

    @property
    def shared_hidden(self) -> int:
        """The shared experts' hidden width together: shared_experts x the granularity-1 expert
        width (`expert_d_ff`, d_ff until resolution fills it)."""
        return self.shared_experts * (self.expert_d_ff if self.expert_d_ff is not None
                                      else self.d_ff)

    @property
    def routed_experts(self) -> int:
        """The router's outputs, E x G: the experts a token can be routed to."""
        return self.n_experts * self.granularity

    @property
    def routed_top_k(self) -> int:
        """The experts each token is routed to, K x G."""
        return self.top_k * self.granularity

    def is_moe_layer(self, layer: int) -> bool:
        return self.n_experts > 0 and layer % self.moe_every == self.moe_offset

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.n_layers) if self.is_moe_layer(i))

    @property
    def family(self) -> str:
        return "moe" if self.moe_layers else "dense"

    def check(self, prefix: str = "model") -> None:
        _non_negative(self, prefix, ("output_z_loss_weight",))
        _positive(self, prefix, ("vocab_size", "seq_len", "d_model", "n_layers", "n_heads",
                                 "d_head", "attn_width", "d_ff", "expert_d_ff", "top_k",
                                 "moe_every", "rel_pos_buckets", "rel_pos_max_distance",
                                 "granularity"))
        _non_negative(self, prefix, ("shared_experts",))
        check(self.n_experts >= 0, f"{prefix}.n_experts",
              f"must be >= 0 (0 = dense), got {self.n_experts}.")
        if self.d_head is None:
            check(self.d_model % self.n_heads == 0, f"{prefix}.d_head",
                  f"not set and d_model={self.d_model} is not divisible by "
                  f"n_heads={self.n_heads}; set model.d_head explicitly.")
        if self.attn_width is not None:
            check(self.attn_width == self.attention_width, f"{prefix}.attn_width",
                  f"{self.attn_width} != n_heads * d_head = {self.n_heads} * {self.head_dim} = "
                  f"{self.attention_width}; fix n_heads, d_head or attn_width.")
        if self.n_experts > 0:
            check(self.top_k <= self.n_experts, f"{prefix}.top_k",
                  f"top_k={self.top_k} > n_experts={self.n_experts}; an MoE layer cannot pick "
                  "more experts than it has (for E=1 set model.top_k=1).")
            check(0 <= self.moe_offset < self.moe_every, f"{prefix}.moe_offset",
                  f"must be in [0, moe_every={self.moe_every}), got {self.moe_offset}.")
        check(self.rel_pos_max_distance > self.rel_pos_buckets // 2,
              f"{prefix}.rel_pos_max_distance",
              f"must exceed rel_pos_buckets // 2 = {self.rel_pos_buckets // 2}.")
        self.router.check(f"{prefix}.router")


@dataclass
class SourceConfig(Section):
    """One source of a text corpus (`data.kind=text`); GLaM mixes six (Du et al. 2021, Table 3)."""

    name: str = doc("web", "source name: metric keys val_loss/<name>, shard folders")
    paths: list[str] = doc(list, "files or globs (.jsonl, .jsonl.gz, .parquet, .txt, .txt.gz); "
                                 "fsspec URLs (gs://, s3://) need their filesystem package",
                           factory=True)
    builtin: Optional[BuiltinText] = doc(None, "generated or shipped text instead of paths: "
                                               "reference, docstrings (Python's), world_wiki, "
                                               "world_books, world_conversations, world_web "
                                               "(data.world_sources)")
    text_field: str = doc("text", "JSONL key / parquet column holding a document's text")
    label_field: Optional[str] = doc(None, "JSONL key / parquet column with a known quality "
                                           "label per document (e.g. a generator's kind): used "
                                           "only to report the quality filter per label (in the "
                                           "manifest), never a feature")
    txt_unit: TextUnit = doc(TextUnit.file, ".txt files: one document per file or per line")
    weight: float = doc(1.0, "mixture weight: share of training tokens drawn from this source")
    quality: Optional[QualityRole] = doc(None, "quality filter: curated (its positive "
                                               "examples), web (its negatives, and filtered), "
                                               "null (neither)")
    val_share: float = doc(0.01, "share of documents held out for validation, in [0, 1)")

    def check(self, prefix: str) -> None:
        check(bool(re.fullmatch(r"[A-Za-z0-9_\-]+", self.name)) and len(self.name) <= 64,
              f"{prefix}.name", f"{self.name!r} names metrics (val_loss/<name>) and folders: "
              "use at most 64 letters, digits, '_' and '-'.")
        check(bool(self.paths) != (self.builtin is not None), f"{prefix}.paths",
              "give at least one file or glob." if self.builtin is None else
              f"a builtin source ({self.builtin}) takes no paths; remove them.")
        check(bool(self.text_field), f"{prefix}.text_field", "must not be empty.")
        check(self.label_field != self.text_field, f"{prefix}.label_field",
              f"is the text field ({self.text_field!r}); name the field holding the labels.")
        check(self.weight >= 0, f"{prefix}.weight",
              f"must be >= 0 (a share of the mixture), got {self.weight}.")
        check(0 <= self.val_share < 1, f"{prefix}.val_share",
              f"must be in [0, 1), got {self.val_share}.")


@dataclass
class TokenizerConfig(Section):
    """The SentencePiece tokenizer of a text corpus: trained by `glam-data prepare`, or given."""

    path: Optional[str] = doc(None, "an existing SentencePiece .model; null: train one")
    model_type: TokenizerModel = doc(TokenizerModel.unigram, "unigram or bpe (trained only)")
    vocab_size: int = doc(8000, "pieces of a trained tokenizer (GLaM: 256K)")
    byte_fallback: bool = doc(True, "unknown characters as UTF-8 bytes, never <unk>")
    character_coverage: float = doc(0.9995, "share of characters covered by pieces")
    sample_chars: int = doc(5_000_000, "characters of the training sample, drawn from every "
                                       "source in proportion to its weight")

    def check(self, prefix: str = "data.tokenizer") -> None:
        _positive(self, prefix, ("vocab_size", "sample_chars"))
        check(0 < self.character_coverage <= 1, f"{prefix}.character_coverage",
              f"must be in (0, 1], got {self.character_coverage}.")
        # Every piece is learnt from the sample's text: fewer characters than pieces cannot
        # train the vocabulary (SentencePiece wants tens of characters a piece).
        check(self.path is not None or self.sample_chars >= self.vocab_size,
              f"{prefix}.sample_chars",
              f"{self.sample_chars:,} characters cannot train {self.vocab_size:,} pieces (fewer "
              "characters than pieces); raise it to tens of characters a piece (the default is "
              f"5,000,000) or lower {prefix}.vocab_size.")


@dataclass
class QualityConfig(Section):
    """GLaM's quality filter of web text (Du et al. 2021, section 4, after GPT-3 appendix A): a
    logistic regression on hashed word n-grams scores how much a document looks like the
    curated sources; web documents are then kept by `selection`."""

    selection: Selection = doc(Selection.none, "none (no filter), pareto (keep when a "
                                               "Pareto(alpha) draw > 1 - score) or threshold")
    alpha: float = doc(9.0, "Pareto shape (GPT-3 and GLaM: 9)")
    threshold: float = doc(0.5, "selection=threshold: keep when score >= threshold")
    n_features: int = doc(2**20, "hash buckets of the word n-gram features (a power of two)")
    ngram_max: int = doc(2, "longest word n-gram (2: unigrams and bigrams)")
    train_docs: int = doc(20_000, "documents per class in the classifier's seeded sample")
    holdout_share: float = doc(0.2, "share of that sample held out to evaluate it")
    regularization: float = doc(1.0, "inverse L2 strength C of the logistic regression")
    samples: int = doc(20, "kept and dropped documents recorded per web source")
    good_label: str = doc("clean", "label (a source's label_field) of the documents the filter "
                                   "should keep: its precision and recall are reported for it")

    def check(self, prefix: str = "data.quality") -> None:
        check(self.alpha > 0, f"{prefix}.alpha", f"must be > 0 (a Pareto shape), got {self.alpha}.")
        _in_unit_interval(self, prefix, ("threshold",))
        check(self.n_features >= 2**10 and self.n_features & (self.n_features - 1) == 0,
              f"{prefix}.n_features", f"must be a power of two >= 1024, got {self.n_features} "
              "(GLaM-scale: 2**18 to 2**20).")
        check(1 <= self.ngram_max <= 3, f"{prefix}.ngram_max", f"1 to 3, got {self.ngram_max}.")
        _positive(self, prefix, ("train_docs", "regularization"))
        _non_negative(self, prefix, ("samples",))
        check(0 < self.holdout_share < 1, f"{prefix}.holdout_share",
              f"must be in (0, 1), got {self.holdout_share}.")


@dataclass
class WorldSourcesConfig(Section):
    """The synthetic world rendered as GLaM-like sources (`glam.data.world_text`), for the data
    quality study: `world_wiki` clean biographies, `world_books` the grammar's prose,
    `world_conversations` question-answer exchanges, `world_web` clean pages mixed with
    low-quality ones in the shares below (the rest clean)."""

    wiki_documents: int = doc(4000, "world_wiki: biographies")
    books_documents: int = doc(2000, "world_books: prose documents")
    conversations_documents: int = doc(3000, "world_conversations: question-answer exchanges")
    web_documents: int = doc(8000, "world_web: pages")
    wrong_facts: float = doc(0.15, "web: biographies whose values are wrong")
    word_salad: float = doc(0.15, "web: the world's words in random order")
    boilerplate: float = doc(0.1, "web: navigation and legal boilerplate, repeated")
    truncated: float = doc(0.1, "web: a clean page cut after its first fifth to third")
    near_duplicates: float = doc(0.1, "web: a copy of an earlier clean page, one word changed")

    def check(self, prefix: str = "data.world_sources") -> None:
        _positive(self, prefix, ("wiki_documents", "books_documents", "conversations_documents",
                                 "web_documents"))
        kinds = ("wrong_facts", "word_salad", "boilerplate", "truncated", "near_duplicates")
        _in_unit_interval(self, prefix, kinds)
        check(sum(getattr(self, k) for k in kinds) <= 1, prefix,
              "the low-quality shares add up to more than 1.")


@dataclass
class EngineConfig(Section):
    """The Dask cluster `glam-data prepare` runs on."""

    address: Optional[str] = doc(None, "scheduler address (tcp://host:8786); null: local "
                                       "worker processes on this machine")
    workers: int = doc(0, "local worker processes; 0: one per CPU core")

    def check(self, prefix: str = "data.engine") -> None:
        _non_negative(self, prefix, ("workers",))


@dataclass
class DataConfig(Section):
    """The corpus: the seeded synthetic world (`glam.data.world`), or prepared text
    (`glam.data.text`, prepared by `glam-data prepare`)."""

    kind: DataKind = doc(DataKind.world, "corpus kind: world (generated) or text (prepared)")
    n_entities: int = doc(400, "world: people in the world")
    n_attributes: int = doc(4, "world: facts per person (at most the attribute catalogue's 6)")
    templates_per_attribute: int = doc(3, "world: sentence forms per fact, 1..4")
    filler_share: float = doc(0.1, "world: share of documents that are grammar filler")
    qa_share: float = doc(0.2, "world: share of documents that are QA lines, in [0, 1]")
    qa_entity_fraction: float = doc(0.5, "world: share of people whose QA lines are in training")
    popularity: float = doc(0.0, "world: Zipf exponent of how often each person is written "
                                 "about (person of rank r drawn ~ r^-popularity); 0: uniform")
    train_tokens: int = doc(2_000_000, "world: training stream length (tokens)")
    val_tokens: int = doc(65_536, "world: validation stream length (tokens)")
    seed: int = doc(1234, "seed of the world and its streams; text: of the tokenizer sample "
                          "and the validation split (train.seed shuffles)")
    sources: list[SourceConfig] = doc(list, "text: the sources and their mixture weights",
                                      factory=True)
    prepared_dir: str = doc("data/prepared", "text: folder of the token shards and manifest "
                                             "(relative: to the working directory)")
    tokenizer: TokenizerConfig = doc(TokenizerConfig, "text: the SentencePiece tokenizer",
                                     factory=True)
    malformed: Malformed = doc(Malformed.stop, "text: a malformed input line stops the "
                                               "preparation, or is counted and skipped")
    segment_ids: bool = doc(False, "text: attention stays within each packed document")
    quality: QualityConfig = doc(QualityConfig, "text: the quality filter of web sources",
                                 factory=True)
    world_sources: WorldSourcesConfig = doc(WorldSourcesConfig, "text: the world rendered as "
                                            "wiki, books and web sources", factory=True)
    engine: EngineConfig = doc(EngineConfig, "text: where glam-data prepare runs", factory=True)

    def check(self, prefix: str = "data") -> None:
        _positive(self, prefix, ("n_entities", "n_attributes", "templates_per_attribute",
                                 "train_tokens", "val_tokens"))
        check(self.templates_per_attribute <= 4, f"{prefix}.templates_per_attribute",
              "at most 4.")
        _in_unit_interval(self, prefix, ("filler_share", "qa_share", "qa_entity_fraction"))
        check(0 <= self.popularity <= 4, f"{prefix}.popularity",
              f"{self.popularity} is not a Zipf exponent in [0, 4] (0: uniform, 1: Zipf's law).")
        check(self.filler_share + self.qa_share <= 1, f"{prefix}.qa_share",
              "filler_share + qa_share must be <= 1.")
        self.tokenizer.check(f"{prefix}.tokenizer")
        self.quality.check(f"{prefix}.quality")
        self.world_sources.check(f"{prefix}.world_sources")
        self.engine.check(f"{prefix}.engine")
        if self.kind != DataKind.text:
            return
        check(bool(self.sources), f"{prefix}.sources",
              "data.kind=text needs at least one source (name, paths, weight).")
        names = set()
        for i, source in enumerate(self.sources):
            source.check(f"{prefix}.sources[{i}]")
            check(source.name not in names, f"{prefix}.sources[{i}].name",
                  f"{source.name!r} is used twice; source names must be distinct.")
            names.add(source.name)
        check(sum(s.weight for s in self.sources) > 0, f"{prefix}.sources",
              "the mixture weights are all zero; give at least one source a positive weight.")
        if self.quality.selection != Selection.none:
            for role in QualityRole:
                check(any(s.quality == role for s in self.sources), f"{prefix}.quality.selection",
                      f"{self.quality.selection} filtering needs a source with quality: {role} "
                      "(curated sources are the classifier's positives, web sources its "
                      "negatives and what it filters); mark one, or selection=none.")
        check(any(s.val_share > 0 for s in self.sources), f"{prefix}.sources",
              "every val_share is 0: hold out some documents of at least one source for the "
              "validation loss.")
        check(bool(self.prepared_dir), f"{prefix}.prepared_dir", "must not be empty.")


@dataclass
class OptimizerConfig(Section):
    """`adamw`, or `adafactor` with GLaM's settings (beta1 0, decay 1 - t^-0.8 capped at
    `beta2_cap`, update clipping, factored second moments). Peak rate: `schedule.learning_rate`."""

    name: OptimizerName = doc(OptimizerName.adamw, "adamw | adafactor")
    b1: float = doc(0.9, "AdamW first-moment decay")
    b2: float = doc(0.95, "AdamW second-moment decay")
    weight_decay: float = doc(0.01, "decoupled weight decay (per step, times the rate)")
    grad_clip_norm: Optional[float] = doc(1.0, "global gradient-norm clip; null: none")
    decay_rate: float = doc(0.8, "Adafactor second-moment decay exponent")
    beta2_cap: float = doc(0.99, "Adafactor cap on the second-moment decay, in (0, 1]")
    update_clipping: Optional[float] = doc(1.0, "Adafactor update RMS clip; null: none")
    factored: bool = doc(True, "Adafactor factored second moments")
    min_dim_size_to_factor: int = doc(128, "Adafactor factors dimensions at least this big")
    multiply_by_parameter_scale: bool = doc(True, "Adafactor relative step size")

    def check(self, prefix: str = "optimizer") -> None:
        for name in ("b1", "b2"):
            value = getattr(self, name)
            check(0 <= value < 1, f"{prefix}.{name}", f"must be in [0, 1), got {value}.")
        check(0 < self.beta2_cap <= 1, f"{prefix}.beta2_cap", "must be in (0, 1].")
        _non_negative(self, prefix, ("weight_decay",))
        _positive(self, prefix, ("grad_clip_norm", "update_clipping", "min_dim_size_to_factor",
                                 "decay_rate"))


@dataclass
class ScheduleConfig(Section):
    """Learning rate over steps. `glam`: constant for `constant_steps`, then inverse square root;
    `cosine`: linear warmup then cosine decay to end_lr_fraction; `wsd`: warmup, stable, then
    linear decay over the last `decay_fraction` of training."""

    name: ScheduleName = doc(ScheduleName.cosine, "glam | cosine | wsd")
    learning_rate: float = doc(3e-3, "peak learning rate")
    warmup_steps: int = doc(30, "linear warmup (steps)")
    constant_steps: int = doc(10_000, "glam: constant-rate steps before the 1/sqrt decay")
    decay_fraction: float = doc(0.2, "wsd: share of training in the final decay, in (0, 1]")
    end_lr_fraction: float = doc(0.1, "cosine/wsd: final rate / peak rate, in [0, 1]")

    def check(self, prefix: str = "schedule") -> None:
        check(0 < self.learning_rate <= 1, f"{prefix}.learning_rate",
              f"must be in (0, 1], got {self.learning_rate}.")
        for name in ("warmup_steps", "constant_steps"):
            check(getattr(self, name) >= 0, f"{prefix}.{name}", "must be >= 0.")
        check(0 < self.decay_fraction <= 1, f"{prefix}.decay_fraction", "must be in (0, 1].")
        check(0 <= self.end_lr_fraction <= 1, f"{prefix}.end_lr_fraction",
              "must be in [0, 1].")


@dataclass
class TrainConfig(Section):
    """The training loop."""

    steps: int = doc(600, "optimizer updates (of the token budget x1; see token_multiple)")
    token_multiple: float = doc(1.0, "train on this multiple of the token budget: resolution "
                                     "sets steps to round(steps x token_multiple) (an arm with "
                                     "more data, as the data quality study's 3x unfiltered)")
    flops_budget: Optional[float] = doc(None, "training FLOPs to spend: resolution sets steps "
                                             "to round(budget / (3 x forward FLOPs per token "
                                             "x batch_size x model.seq_len)), less what the "
                                             "train.init_from run spent; null: use steps")
    batch_size: int = doc(16, "global batch (sequences of model.seq_len + 1 tokens)")
    seed: int = doc(0, "seed of the initial weights, batches and routing noise")
    log_every: int = doc(10, "health check and metric fetch every this many steps")
    eval_batches: int = doc(8, "validation batches per evaluation")
    progress: bool = doc(True, "show a progress bar")
    resume: Resume = doc(Resume.auto, "auto: continue the newest checkpoint of the run "
                                      "directory; never: refuse a directory with checkpoints")
    compilation_cache_dir: Optional[str] = doc(None, "JAX's persistent compilation cache: "
                                                     "programs compiled once are loaded by "
                                                     "every later run using this folder (a "
                                                     "study shares one); null: off")
    init_from: Optional[str] = doc(None, "sparse upcycling: a finished dense run (export "
                                         "folder, run directory or MLflow run id) whose weights "
                                         "start this MoE run, every expert a copy of the dense "
                                         "FFN it replaces (Komatsuzaki et al. 2022); its "
                                         "training FLOPs count against train.flops_budget")

    def check(self, prefix: str = "train") -> None:
        _positive(self, prefix, ("steps", "token_multiple", "batch_size", "log_every",
                                 "eval_batches"))
        if self.flops_budget is not None:
            check(math.isfinite(self.flops_budget) and self.flops_budget > 0,
                  f"{prefix}.flops_budget", f"must be a positive number of FLOPs or null, got "
                  f"{self.flops_budget}.")
            check(self.token_multiple == 1, f"{prefix}.flops_budget",
                  f"sets the steps itself; drop train.token_multiple={self.token_multiple} or "
                  "the budget.")
        check(self.init_from is None or bool(self.init_from.strip()), f"{prefix}.init_from",
              "is empty; give a finished dense run (its directory, export folder or MLflow run "
              "id), or null to start from scratch.")


@dataclass
class CheckpointConfig(Section):
    """Orbax checkpoints under `<run dir>/checkpoints`."""

    every: int = doc(100, "save every this many steps (0: no checkpoints)")
    keep: int = doc(3, "newest checkpoints kept")
    async_save: bool = doc(True, "write in the background")

    def check(self, prefix: str = "checkpoint") -> None:
        check(self.every >= 0, f"{prefix}.every", "must be >= 0 (0 disables checkpoints).")
        _positive(self, prefix, ("keep",))


@dataclass
class StabilityConfig(Section):
    """GLaM's practice: skip non-finite updates; after `max_consecutive_skips` skipped steps in a
    row, or a loss above `spike_factor` x its mean over the last `spike_window` steps, roll back to
    the last checkpoint and continue on a new data order; give up after `max_rollbacks`."""

    max_consecutive_skips: int = doc(5, "skipped steps in a row that trigger a rollback")
    spike_factor: float = doc(3.0, "loss / moving mean that counts as a spike, > 1")
    spike_window: int = doc(50, "healthy steps in the moving mean")
    max_rollbacks: int = doc(3, "rollbacks before giving up")

    def check(self, prefix: str = "stability") -> None:
        _positive(self, prefix, ("max_consecutive_skips", "spike_window"))
        check(self.spike_factor > 1, f"{prefix}.spike_factor", "must be > 1.")
        check(self.max_rollbacks >= 0, f"{prefix}.max_rollbacks", "must be >= 0.")


@dataclass
class FaultConfig(Section):
    """Fault injection for testing the stability paths; all off by default. Faults fire on the
    first data order only unless `repeat_after_rollback`."""

    nonfinite_steps: list[int] = doc(list, "steps whose loss is multiplied by NaN", factory=True)
    spike_steps: list[int] = doc(list, "steps whose loss is multiplied by spike_scale",
                                 factory=True)
    spike_scale: float = doc(100.0, "loss multiplier of a spike step")
    crash_at_step: Optional[int] = doc(None, "raise before this step, as a killed job would")
    crash_jobs: list[int] = doc(list, "in a multirun, crash_at_step fires in these jobs only "
                                      "(hydra.job.num); empty: in every job", factory=True)
    repeat_after_rollback: bool = doc(False, "faults fire again on later data orders")


@dataclass
class TaskFileConfig(Section):
    """A user task in JSONL (schema in glam/eval/tasks.py)."""

    name: str = doc("task", "metric prefix eval/<name>/")
    kind: TaskKind = doc(TaskKind.nlg, "nlg (generation) | nlu (rank classification)")
    path: str = doc("", "JSONL file of the evaluated examples")
    train_path: Optional[str] = doc(None, "JSONL of demonstrations; null: the other examples")

    def check(self, prefix: str) -> None:
        check(bool(re.fullmatch(METRIC_NAME, self.name)) and len(self.name) <= 100,
              f"{prefix}.name", f"{self.name!r} becomes the metric key eval/{self.name}/...; use "
              "at most 100 letters, digits, '_', '-' and single '.' between words.")
        check(not self.name.endswith("_avg"), f"{prefix}.name",
              f"{self.name!r}: names ending in _avg are the group averages (eval/nlg_avg/...).")
        for name in ("path", "train_path"):
            path = getattr(self, name)
            if path is not None:
                check(Path(path).is_file(), f"{prefix}.{name}",
                      f"no file at {path!r}; give the path of a JSONL task file.")


@dataclass
class EvalConfig(Section):
    """Few-shot evaluation during training and at the end (GLaM, Du et al. 2021, section 5)."""

    every: int = doc(0, "evaluate every this many steps (0: at the end only)")
    shots: list[int] = doc(lambda: [0, 1, 3], "demonstrations per prompt, one score each",
                           factory=True)
    builtin: bool = doc(True, "the world's own tasks")
    tasks: list[TaskFileConfig] = doc(list, "user tasks from JSONL", factory=True)
    max_examples: int = doc(200, "examples per task")
    max_answer_tokens: int = doc(4, "greedy tokens generated per answer")
    length_normalize: bool = doc(False, "nlu: score options by mean, not summed, log p")
    batch_size: int = doc(64, "prompts per compiled evaluation batch")
    seed: int = doc(0, "seed of the demonstrations and of the knowledge probe's sample")
    knowledge_facts: int = doc(4096, "world: facts the knowledge probe scores (all when the "
                                     "world has fewer; glam.eval.knowledge); 0: no probe")

    def check(self, prefix: str = "eval") -> None:
        check(self.every >= 0, f"{prefix}.every", "must be >= 0 (0: evaluate at the end only).")
        _positive(self, prefix, ("max_examples", "max_answer_tokens", "batch_size"))
        check(self.knowledge_facts == 0 or self.knowledge_facts >= 2000,
              f"{prefix}.knowledge_facts", f"{self.knowledge_facts} facts estimate the world's "
              "knowledge too roughly; use at least 2000, or 0 to turn the probe off.")
        check(all(k >= 0 for k in self.shots), f"{prefix}.shots",
              f"shot counts must be >= 0, got {list(self.shots)}.")
        names = set()
        for i, task in enumerate(self.tasks):
            task.check(f"{prefix}.tasks[{i}]")
            check(task.name not in names, f"{prefix}.tasks[{i}].name",
                  f"{task.name!r} is used twice; their metrics would overwrite each other.")
            names.add(task.name)


@dataclass
class LoggerConfig(Section):
    """MLflow tracking."""

    tracking_uri: str = doc("sqlite:///mlflow.db", "MLflow store; conf: $MLFLOW_TRACKING_URI "
                                                   "else ./mlflow.db")
    experiment: str = doc("glam", "MLflow experiment (a study sets its own)")
    run_name: Optional[str] = doc(None, "MLflow run name; null: family-E-size-tokens-seed")
    export: bool = doc(True, "write the trained model (safetensors, config, tokenizer) to "
                             "<run dir>/model/ and the artifact model/; every host gathers "
                             "the parameters, so turn it off for models larger than host memory")
    register_model: Optional[str] = doc(None, "register the exported model (artifact model/) "
                                              "under this name in MLflow's model registry; "
                                              "null: export only")
    flush_every: int = doc(50, "without checkpoints: publish metrics every this many points")
    outage_timeout_s: float = doc(600.0, "seconds of failed MLflow writes before the run fails "
                                         "(records are kept and retried until then)")

    def check(self, prefix: str = "logger") -> None:
        _positive(self, prefix, ("flush_every", "outage_timeout_s"))
        check(0 < len(self.experiment) <= 500, f"{prefix}.experiment",
              "an MLflow experiment name has 1 to 500 characters.")
        scheme = self.tracking_uri.partition("://")[0].split("+")[0] \
            if "://" in self.tracking_uri else ""
        shown = re.sub(r"//[^/@]*@", "//***@", self.tracking_uri)  # never print a secret
        check(scheme in TRACKING_SCHEMES, f"{prefix}.tracking_uri",
              f"{shown!r}: unknown scheme {scheme!r}; use one of "
              + ", ".join(f"{s}://" for s in TRACKING_SCHEMES)
              + " (e.g. sqlite:///mlflow.db or http://host:5000).")
        check(not self.register_model or self.export, f"{prefix}.register_model",
              f"{self.register_model!r} registers the exported model, but logger.export is "
              "false; turn export on or drop register_model.")


@dataclass
class MeshConfig(Section):
    """Device mesh axis sizes (`glam.mesh`); -1 fills the remaining devices."""

    data: int = doc(-1, "data-parallel devices (-1: fill)")
    expert: int = doc(1, "expert-parallel devices (also split the batch)")
    model: int = doc(1, "tensor-parallel devices (heads, FFN width)")
    fsdp: bool = doc(False, "also shard parameters and optimizer state over data")

    def check(self, prefix: str = "mesh") -> None:
        for axis in ("data", "expert", "model"):
            size = getattr(self, axis)
            check(size == -1 or size > 0, f"{prefix}.{axis}",
                  f"must be positive or -1, got {size}.")


@dataclass
class DistributedConfig(Section):
    """Multi-host JAX (`glam.distributed`). `init`: `auto` starts jax.distributed when
    `num_processes` > 1 or a multi-process launch is detected (srun, mpirun, a TPU slice,
    Hydra's submitit_local with several tasks); `always` starts it and lets JAX detect the rest;
    `never` runs one process. conf/config.yaml defaults the fields to $GLAM_COORDINATOR_ADDRESS,
    $GLAM_NUM_PROCESSES and $GLAM_PROCESS_ID."""

    init: DistributedInit = doc(DistributedInit.auto, "auto | always | never")
    coordinator_address: Optional[str] = doc(None, "host:port of process 0")
    num_processes: Optional[int] = doc(None, "processes of the run")
    process_id: Optional[int] = doc(None, "this process, in [0, num_processes)")
    local_device_ids: Optional[list[int]] = doc(None, "devices this process drives")

    def check(self, prefix: str = "distributed") -> None:
        _positive(self, prefix, ("num_processes",))
        if self.process_id is not None:
            n = self.num_processes
            check(self.process_id >= 0 and (n is None or self.process_id < n),
                  f"{prefix}.process_id",
                  f"must be in [0, num_processes) = [0, {n}), got {self.process_id}.")
        address = self.coordinator_address
        if address is not None:
            host, _, port = address.rpartition(":")
            check(bool(host) and port.isdigit(), f"{prefix}.coordinator_address",
                  f"{address!r} is not host:port (e.g. 10.0.0.1:1234, the address of "
                  "process 0).")


@dataclass
class PlanConfig(Section):
    """How an MoE model is placed against its dense counterpart (`glam.placement`)."""

    placement: Placement = doc(Placement.glam, "glam: experts as wide as the dense FFN; "
                                               "matched: width solved for equal FLOPs")
    tolerance: float = doc(0.02, "largest relative activated-FLOPs gap of a matched study")

    def check(self, prefix: str = "plan") -> None:
        check(0 < self.tolerance < 1, f"{prefix}.tolerance", "must be in (0, 1).")


@dataclass
class StudyConfig(Section):
    """Set by a study (`+study=<name>`, `sweeps/study/`): its MLflow experiment and parent run."""

    name: Optional[str] = doc(None, "study name: MLflow experiment, parent run, output folder")
    match_flops: bool = doc(False, "refuse points whose activated FLOPs differ from their "
                                   "dense counterpart's by more than plan.tolerance")

    def check(self, prefix: str = "study") -> None:
        if self.name is not None:
            check(bool(re.fullmatch(METRIC_NAME, self.name)) and len(self.name) <= 100,
                  f"{prefix}.name", f"{self.name!r} names a folder under outputs/studies/ and "
                  "an MLflow experiment: use letters, digits, '_', '-' and single '.' only.")


@dataclass
class Config(Section):
    """The whole configuration, as composed (raw: derived values may be unset)."""

    model: ModelConfig = doc(ModelConfig, "the decoder", factory=True)
    data: DataConfig = doc(DataConfig, "the corpus", factory=True)
    optimizer: OptimizerConfig = doc(OptimizerConfig, "the optimizer", factory=True)
    schedule: ScheduleConfig = doc(ScheduleConfig, "the learning-rate schedule", factory=True)
    train: TrainConfig = doc(TrainConfig, "the training loop", factory=True)
    checkpoint: CheckpointConfig = doc(CheckpointConfig, "checkpoints", factory=True)
    stability: StabilityConfig = doc(StabilityConfig, "skips and rollbacks", factory=True)
    faults: FaultConfig = doc(FaultConfig, "fault injection (tests)", factory=True)
    eval: EvalConfig = doc(EvalConfig, "few-shot evaluation", factory=True)
    mesh: MeshConfig = doc(MeshConfig, "device mesh", factory=True)
    distributed: DistributedConfig = doc(DistributedConfig, "multi-host", factory=True)
    plan: PlanConfig = doc(PlanConfig, "MoE placement", factory=True)
    study: StudyConfig = doc(StudyConfig, "the study this run belongs to", factory=True)
    logger: LoggerConfig = doc(LoggerConfig, "MLflow", factory=True)

    def check(self, prefix: str = "") -> None:
        """Every section's own checks, after refusing any non-finite number anywhere."""
        for path, value in _leaves(self):
            if isinstance(value, float):
                check(math.isfinite(value), path, f"must be a finite number, got {value}.")
        for f in dataclasses.fields(Config):
            getattr(self, f.name).check(f.name)


def _leaves(section: Section, prefix: str = ""):
    """(dotted path, value) of every leaf of `section`, list items included."""
    for f in dataclasses.fields(section):
        value, path = getattr(section, f.name), f"{prefix}{f.name}"
        if isinstance(value, Section):
            yield from _leaves(value, f"{path}.")
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                if isinstance(item, Section):
                    yield from _leaves(item, f"{path}[{i}].")
                else:
                    yield f"{path}[{i}]", item
        else:
            yield path, value


def leaf_fields(cls: type = Config, prefix: str = "") -> list[str]:
    """Dotted paths of every leaf field of a section class (`model.router.dispatch`, ...)."""
    out = []
    for f in dataclasses.fields(cls):
        kind = f.type if isinstance(f.type, type) else globals().get(str(f.type))
        name = f"{prefix}{f.name}"
        if isinstance(kind, type) and issubclass(kind, Section):
            out += leaf_fields(kind, f"{name}.")
        else:
            out.append(name)
    return out
