"""The typed schema of `params.yaml` and its one loader.

`params.yaml` is the single source of parameters. Each top-level section maps to one frozen
pydantic model below; `load_params` validates the whole file at once, rejects unknown keys and
wrong types with a message that names the file and the dotted key, and returns a `Params`
object whose sections are handed to the stages (`run(cfg.synth, ...)`). Names here are the
names in `params.yaml`, in `dvc.yaml` `params:` lists and in MLflow params.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from components.errors import CapfiltError

DEFAULT_PARAMS = Path("params.yaml")


class Section(BaseModel):
    """Base of every params section: frozen, unknown keys are an error, no silent coercion."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


# --- synth: the embedded corpus -------------------------------------------------------------


class NoiseMix(Section):
    """Proportions of the web texts by kind; they must sum to 1."""

    correct: float = Field(0.45, ge=0, le=1)  # a true, usually partial, description
    wrong_attribute: float = Field(0.10, ge=0, le=1)  # one attribute swapped (colour, shape, ...)
    other_image: float = Field(0.25, ge=0, le=1)  # the alt-text of another image
    junk: float = Field(0.20, ge=0, le=1)  # file names, shop phrases, boilerplate

    @model_validator(mode="after")
    def _sums_to_one(self) -> NoiseMix:
        total = self.correct + self.wrong_attribute + self.other_image + self.junk
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"noise proportions must sum to 1, got {total:.4f}")
        return self


class SynthConfig(Section):
    """The procedural image-text world (see components/synth.py for the design)."""

    seed: int = Field(0, ge=0)
    image_size: int = Field(64, ge=32, le=1024, multiple_of=2)  # square; 2×2 position grid
    n_human: int = Field(1000, ge=1)  # images in the human (COCO-style) set
    captions_per_image: int = Field(5, ge=1, le=20)
    n_web: int = Field(8000, ge=1)  # images in the noisy web set, one text each
    n_test: int = Field(300, ge=1)  # held-out images with reference captions
    max_objects: int = Field(3, ge=1, le=4)  # one object per quadrant at most
    duplicate_prob: float = Field(0.2, ge=0, le=1)  # an object repeats an earlier one: "two ..."
    jitter: int = Field(1, ge=0, le=16)  # max pixels an object moves off its quadrant's centre
    backgrounds: list[Literal["black", "grey", "white"]] = Field(default_factory=lambda: ["black"], min_length=1)  # one per scene, uniformly
    noise: NoiseMix = NoiseMix()
    # Human images show each shape in only this many of the five colours (web and test images in
    # all): 5 = no gap; fewer leaves shape-colour pairs that only web texts describe, as real human
    # captions cover fewer concepts than the web (docs/quality.md, "Human captions that miss pairs").
    human_colours_per_shape: int = Field(5, ge=1, le=5)


# --- training: the one loop (components/train.py) ---------------------------------------------


class ScheduleConfig(Section):
    """One training stage's length and learning-rate schedule (components/optim.py:lr_at)."""

    steps: int = Field(300, ge=1)  # optimizer steps
    lr: float = Field(0.001, gt=0)  # peak learning rate
    kind: Literal["cosine", "step"] = "cosine"  # warm-up + cosine, or BLIP's step decay
    warmup_steps: int = Field(30, ge=0)  # linear warm-up to lr
    min_lr: float = Field(0.00001, ge=0)  # floor of both schedules
    decay_rate: float = Field(0.9, gt=0, le=1)  # step: lr·decay_rate^(step // decay_every)
    decay_every: int = Field(100, ge=1)  # step: optimizer steps per decay (BLIP: one epoch)


class TrainConfig(Section):
    """DeepSpeed, optimiser, data-loading and checkpoint settings shared by every training stage."""

    seed: int = Field(0, ge=0)  # each rank seeds with seed + rank
    processes: int = Field(1, ge=1)  # ranks; > 1 starts them through the deepspeed launcher
    hostfile: str | None = None  # multi-node: a deepspeed hostfile (then it sets the ranks)
    zero_stage: int = Field(0, ge=0, le=3)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16/fp16 on GPU only
    micro_batch: int = Field(32, ge=1)  # samples per rank per forward
    grad_accum: int = Field(1, ge=1)  # micro-batches per optimizer step
    grad_clip: float = Field(1.0, ge=0)  # max global grad norm; 0 = off
    weight_decay: float = Field(0.05, ge=0)  # AdamW, matrices only
    threads: int = Field(0, ge=0)  # torch threads per rank; 0 = cores / ranks
    num_workers: int = Field(0, ge=0)  # data-loader worker processes per rank
    shuffle_buffer: int = Field(1000, ge=1)  # samples held for shuffling the stream
    checkpoint_every: int = Field(100, ge=1)  # optimizer steps between resume checkpoints
    keep_checkpoints: int = Field(1, ge=1)  # complete resume checkpoints kept
    resume: bool = True  # continue from the latest complete checkpoint of the same run
    log_every: int = Field(10, ge=1)  # optimizer steps between loss.csv rows / log lines


class ModelSection(Section):
    """The BLIP model: a preset of models/config.py plus dotted overrides ("vision.depth": 2)."""

    preset: Literal["tiny", "base", "large"] = "tiny"
    overrides: dict[str, int | float | bool | str] = Field(default_factory=dict)


class AugmentConfig(Section):
    """BLIP's train-time image augmentation. Keep it off for the embedded corpus: its captions
    name positions (a flip swaps left and right) and every object (a crop can drop one)."""

    enabled: bool = False  # off: resize + normalise only (the eval transform)
    min_scale: float = Field(0.5, gt=0, le=1)  # RandomResizedCrop scale (BLIP: 0.2 pretrain, 0.5 tune)
    hflip: bool = True  # random horizontal flip
    randaugment: bool = True  # RandAugment, 2 ops at magnitude 5


class TextAugmentConfig(Section):
    """Partial captions and word-swap ITM negatives (neither is in BLIP's recipe, so both are off by
    default here; the embedded default's params cut every caption of the filter fine-tune).

    Human captions describe a whole image, web alt-texts only part of it; an ITM head that only
    ever saw whole descriptions as positives scores true-but-partial texts as mismatches. With
    probability `partial` a training caption is cut to a random non-empty subset of its clauses
    (split at commas, "and", "with"), then each word is dropped with probability `word_drop`
    (at least one word stays). Language-agnostic enough for real captions; seeded per sample."""

    partial: float = Field(0.0, ge=0, le=1)  # share of captions replaced by a partial one
    word_drop: float = Field(0.15, ge=0, lt=1)  # per-word drop rate inside a partial caption
    # Share of captions that also bring a word-swap ITM negative (where one of their words has a
    # substitute): the same (possibly partial) text with one word replaced by another seen in the
    # same context in the training captions (components/text.py `SwapTable`), matched against the
    # caption's own image. Up to B more ITM negatives per step: p(match) comes out lower.
    swap_negative: float = Field(0.0, ge=0, le=1)
    # Share of captions whose ITM negative instead exchanges two of their words that substitute for
    # each other ("a red ring and a blue cross" -> "a blue ring and a red cross"; `SwapTable.exchange`):
    # the same words bound to the wrong objects. Needs a caption with two such words; with
    # `swap_negative` the two shares are disjoint (their sum at most 1).
    exchange_negative: float = Field(0.0, ge=0, le=1)
    # Share of captions whose ITM negative is instead a text of another image drawn from a corpus:
    # the filter's `negative_manifests`, else the stage's own captions (the web corpus as that
    # corpus teaches the filter its phrasing, not its noise: docs/quality.md, "Corpus negatives"). Texts that only ever met images in pre-training — alt-text boilerplate, file
    # names — otherwise never appear as a mismatch in the fine-tune, and keep whatever p(match)
    # pre-training left them.
    corpus_negative: float = Field(0.0, ge=0, le=1)

    @model_validator(mode="after")
    def _negative_shares(self) -> TextAugmentConfig:
        total = self.swap_negative + self.exchange_negative + self.corpus_negative
        if total > 1:
            raise ValueError(f"swap_negative + exchange_negative + corpus_negative is {total:g}; "
                             "each caption brings at most one negative, so the shares sum to at most 1")
        return self


class TextInput(Section):
    """How captions become token ids (BLIP's pre_caption + the trained WordPiece tokenizer)."""

    max_words: int = Field(30, ge=1)  # pre_caption word limit
    max_tokens: int = Field(32, ge=4)  # [CLS] ... [SEP], truncated


class LossWeights(Section):
    """Weights of pre-training's three losses in their sum (BLIP: 1, 1, 1)."""

    itc: float = Field(1.0, ge=0)
    itm: float = Field(1.0, ge=0)
    lm: float = Field(1.0, ge=0)


class PretrainConfig(Section):
    """Pre-training (ITC + ITM + LM) of a fresh model on ingested manifests (split train rows)."""

    manifests: list[str] = Field(default_factory=lambda: ["outputs/ingest/human/manifest.parquet",
                                                          "outputs/ingest/web/manifest.parquet"])
    tokenizer: str = "outputs/ingest/tokenizer"  # folder of tokenizer.json
    out: str = "outputs/pretrain"  # model/, metrics.json, loss.csv
    resume_dir: str = "outputs/resume/pretrain"  # DeepSpeed checkpoints, for resuming only
    schedule: ScheduleConfig = ScheduleConfig()
    alpha_ramp_steps: int = Field(200, ge=0)  # ITC distillation weight ramps 0 -> model alpha
    # ITC positives: "diagonal" (BLIP's pre-training: each text's own image only) or "image" (every
    # caption of the same image in the batch and the queue, as BLIP's retrieval fine-tune does)
    itc_positives: Literal["diagonal", "image"] = "diagonal"
    loss_weights: LossWeights = LossWeights()  # ITC / ITM / LM weights in the summed loss
    text: TextInput = TextInput()
    augment: AugmentConfig = AugmentConfig(min_scale=0.2)
    text_augment: TextAugmentConfig = TextAugmentConfig()  # off: BLIP's recipe


class RetrainConfig(PretrainConfig):
    """Round 2: a fresh model pre-trained like `pretrain` on the bootstrapped (or any ingested)
    manifest."""

    manifests: list[str] = Field(default_factory=lambda: ["outputs/bootstrap/manifest.parquet"])
    out: str = "outputs/retrain"
    resume_dir: str = "outputs/resume/retrain"


class CaptionerTune(Section):
    """The captioner fine-tune: LM loss on prompted human captions."""

    schedule: ScheduleConfig = ScheduleConfig()
    prompt: str = "a picture of "  # prepended to every caption; its tokens are not predicted
    text: TextInput = TextInput()
    augment: AugmentConfig = AugmentConfig()


class FilterTune(Section):
    """The filter fine-tune: ITC + ITM with every caption of an image as a positive."""

    schedule: ScheduleConfig = ScheduleConfig()
    alpha_ramp_steps: int = Field(100, ge=0)
    text: TextInput = TextInput()
    augment: AugmentConfig = AugmentConfig()
    text_augment: TextAugmentConfig = TextAugmentConfig()
    # texts (split train rows) drawn as `text_augment.corpus_negative` ITM negatives; [] = the human captions
    negative_manifests: list[str] = Field(default_factory=list)


class FinetuneConfig(Section):
    """Both fine-tunes, from the pre-trained model (round 1) or the re-trained one (round 2);
    the tokenizer is the one exported with the initial model."""

    manifest: str = "outputs/ingest/human/manifest.parquet"  # human pairs, split train rows
    round1_init: str = "outputs/pretrain/model"
    round1_out: str = "outputs/finetune"  # <out>/<task>/model, metrics.json, loss.csv
    round2_init: str = "outputs/retrain/model"
    round2_out: str = "outputs/finetune2"
    resume_dir: str = "outputs/resume"  # <resume_dir>/finetune<round>-<task>
    captioner: CaptionerTune = CaptionerTune()
    filter: FilterTune = FilterTune()


# --- validation: dataset-level expectations on manifests (components/expectations.py) --------


class ValidationConfig(Section):
    """Thresholds of the Great Expectations suites; row-level rules live in components/schemas.py.

    Defaults pass on realistic data (COCO-style captions, web alt-texts, the embedded corpus)."""

    min_rows: int = Field(1, ge=0)  # an empty manifest is a failed stage, not a dataset
    max_null_fraction: float = Field(0.0, ge=0, le=1)  # per key column
    max_duplicate_pair_fraction: float = Field(0.01, ge=0, le=1)  # rows in repeated (image_key, caption)
    caption_mean_chars_min: float = Field(8.0, ge=0)  # mean caption length, characters
    caption_mean_chars_max: float = Field(300.0, gt=0)
    caption_q05_chars_min: float = Field(2.0, ge=0)  # 5th percentile of caption length
    caption_q95_chars_max: float = Field(500.0, gt=0)  # 95th percentile of caption length
    min_side: int = Field(8, ge=1)  # width and height of every stored image, pixels
    max_side: int = Field(8192, ge=1)
    min_synthetic_fraction: float = Field(0.01, ge=0, le=1)  # bootstrapped manifests only
    max_synthetic_fraction: float = Field(0.9, ge=0, le=1)

    @model_validator(mode="after")
    def _bounds_ordered(self) -> ValidationConfig:
        pairs = [("caption_mean_chars_min", "caption_mean_chars_max"), ("min_side", "max_side"),
                 ("min_synthetic_fraction", "max_synthetic_fraction")]
        for lo, hi in pairs:
            if getattr(self, lo) > getattr(self, hi):
                raise ValueError(f"{lo} ({getattr(self, lo)}) exceeds {hi} ({getattr(self, hi)})")
        return self


# --- ingest: sources → manifests + image shards (components/ingest.py) ------------------------

INGEST_FORMATS = ("auto", "coco", "karpathy", "blip", "webdataset", "csv", "parquet")


class IngestSource(Section):
    """One source of the ingest stage: an annotation file, a tar shard or folder of them, or an
    s3:// URI (credentials and endpoint from the standard AWS environment, never from here)."""

    path: str
    format: Literal["auto", "coco", "karpathy", "blip", "webdataset", "csv", "parquet"] = "auto"
    image_root: str | None = None  # image paths are relative to it; default: the file's folder
    kind: Literal["human", "web"] = "web"  # the manifest's `source` column
    split: Literal["train", "val", "test"] = "train"
    image_column: str | None = None  # csv/parquet; default: image, filepath, file_name, path
    caption_column: str | None = None  # csv/parquet; default: caption, text, title


class TokenizerConfig(Section):
    """The WordPiece vocabulary trained on the ingested training captions."""

    vocab_size: int = Field(1000, ge=16)  # special tokens included
    min_frequency: int = Field(1, ge=1)  # a word must be seen this often to be a token
    max_words: int = Field(30, ge=1)  # pre_caption word limit (BLIP: 30)


def _default_sources() -> dict[str, IngestSource]:
    return {
        "human": IngestSource(path="data/human/annotations.json", format="coco",
                              image_root="data/human/images", kind="human"),
        "web": IngestSource(path="data/web/web.json", format="blip", kind="web"),
        "test": IngestSource(path="data/test/test.json", format="karpathy", kind="human",
                             split="test"),
    }  # fmt: skip


class IngestConfig(Section):
    """`capfilt ingest` and the ingest stage: image checks, storage, captions, sources."""

    out: str = "outputs/ingest"  # stage output root: one folder per source + tokenizer/
    sources: dict[str, IngestSource] = Field(default_factory=_default_sources)
    workers: int = Field(0, ge=0)  # image worker processes; 0 = os.cpu_count()
    shard_size: int = Field(1000, ge=1)  # images per tar shard
    max_side: int = Field(512, ge=8)  # longer side of the stored image, pixels
    max_pixels: int = Field(89_478_485, ge=1)  # more is a decompression bomb (Pillow's default)
    image_format: Literal["png", "jpeg", "webp"] = "png"  # stored format
    quality: int = Field(90, ge=1, le=100)  # jpeg/webp
    png_compress_level: int = Field(6, ge=0, le=9)
    max_caption_chars: int = Field(1000, ge=1, le=1000)  # longer captions are truncated
    tokenizer: TokenizerConfig = TokenizerConfig()

    @model_validator(mode="after")
    def _source_names(self) -> IngestConfig:
        for name in self.sources:
            if not name.replace("_", "").replace("-", "").isalnum() or name == "tokenizer":
                raise ValueError(f"source name {name!r}: letters, digits, - and _; not 'tokenizer'")
        return self


# --- orchestration: the Prefect flow, MLflow tracking and promotion (flows/) ------------------


class PipelineConfig(Section):
    """The Prefect flow that runs the DVC stages (flows/pipeline.py)."""

    flow_name: str = "capfilt-pipeline"
    stages: list[str] = Field(default_factory=list)  # dvc.yaml stages to run, in DAG order; [] = all
    retries: int = Field(1, ge=0)  # extra attempts of a failed stage before the flow fails
    retry_delay_seconds: float = Field(5.0, ge=0)
    promote: bool = True  # register the models and move `champion` after the stages


class RegisteredModel(Section):
    """One model the flow logs as an MLflow pyfunc and registers under its key in `models`."""

    kind: Literal["captioner", "filter", "blip"]  # captioner: captions; filter/blip: match scores
    dir: str  # exported model directory (config.json + model.safetensors + tokenizer.json)
    metric: str = ""  # dotted key into promote.metrics_file; "" = never promoted automatically


def _default_models() -> dict[str, RegisteredModel]:
    return {
        "capfilt-captioner": RegisteredModel(kind="captioner", dir="outputs/finetune2/captioner/model",
                                             metric="round2.cider"),
        "capfilt-filter": RegisteredModel(kind="filter", dir="outputs/finetune2/filter/model",
                                          metric="filter.auroc"),
        "capfilt-blip": RegisteredModel(kind="blip", dir="outputs/retrain/model",
                                        metric="round2.i2t_r1"),
    }  # fmt: skip


class TrackingConfig(Section):
    """MLflow: where runs go (the URI itself comes from MLFLOW_TRACKING_URI; default
    sqlite:///mlflow.db at the project root, artifacts in mlartifacts/) and what is registered."""

    experiment: str = "capfilt"
    models: dict[str, RegisteredModel] = Field(default_factory=_default_models)
    timeout_seconds: float = Field(10.0, gt=0)  # an unreachable tracking server fails within ~this


class PromoteConfig(Section):
    """Moving the `champion` alias: only when the new version beats it by `margin`."""

    metrics_file: str = "outputs/evaluate/metrics.json"
    margin: float = Field(0.0, ge=0)  # required improvement over the champion's metric
    higher_is_better: bool = True


# --- bootstrap and evaluate: CapFilt and its measurement (components/bootstrap.py, evaluate.py) --


class PhrasesConfig(Section):
    """The bootstrap's table of phrases no human caption uses, by how many more of their web texts
    the filter removed than its average rate (components/phrases.py)."""

    max_words: int = Field(2, ge=1, le=4)  # n-grams of 1..max_words words
    min_texts: int = Field(20, ge=1)  # a phrase counts once at least this many web texts have it
    top: int = Field(20, ge=0)  # rows kept in metrics.json; 0 = the table is off
    sample: int = Field(200_000, ge=1)  # web texts read at most (a seeded sample above it)


class BootstrapConfig(Section):
    """CapFilt: caption every web image, score web and synthetic texts with ITM, keep the matches.

    `signal: itm` scores a text by the ITM p(match) (BLIP's filter); `itm_itc` by the ITM
    log-odds plus the ITC logit (cosine / the filter's temperature), the sum BLIP's retrieval
    ranks by. `threshold: fixed` keeps a text when p(match) >= itm_threshold (`itm` only: the sum
    is not a probability); `calibrated` keeps it when its score clears the one that keeps
    `calibration_keep` of held-out human pairs (the human `val` rows, else a fixed seeded sample
    of `calibration_samples` human training pairs). With `prior_images` > 0 either signal's ITM
    part is the text-prior-corrected one (below)."""

    web_manifest: str = "outputs/ingest/web/manifest.parquet"
    human_manifest: str = "outputs/ingest/human/manifest.parquet"
    captioner: str = "outputs/finetune/captioner/model"  # any capfilt BlipCaptioner directory
    filter: str = "outputs/finetune/filter/model"  # any capfilt BlipFilter directory
    out: str = "outputs/bootstrap"  # manifest, removed, shards/, parts/, metrics.json
    captions_per_image: int = Field(1, ge=1, le=16)  # synthetic captions per web image (K)
    decoding: Literal["nucleus", "beam", "greedy"] = "nucleus"  # BLIP CapFilt: nucleus
    top_p: float = Field(0.9, ge=0, le=1)  # nucleus mass
    repetition_penalty: float = Field(1.1, gt=0)  # BLIP hard-codes 1.1 when sampling
    num_beams: int = Field(3, ge=1)  # beam only
    max_new_tokens: int = Field(16, ge=1)  # BLIP max_length 20 counts the 4 prompt tokens
    min_new_tokens: int = Field(1, ge=0)  # BLIP min_length 5 counts the prompt
    prompt: str = "a picture of "  # fed to the decoder, stripped from the caption
    signal: Literal["itm", "itm_itc"] = "itm"  # what a text is scored by (class docstring)
    threshold: Literal["fixed", "calibrated"] = "fixed"
    itm_threshold: float = Field(0.5, ge=0, le=1)  # fixed: keep when p(match) >= this
    calibration_keep: float = Field(0.95, gt=0, le=1)  # calibrated: held-out human pairs kept
    calibration_samples: int = Field(1000, ge=1)  # human pairs scored when there is no val split
    itc_threshold: float | None = Field(None, ge=-1, le=1)  # optional: also need cosine >= this
    # Text-prior correction (our addition): each text is also matched against `prior_images`
    # reference images (a seeded sample of 64 web images, never its own, picked by its image); its
    # mean ITM log-odds there (its prior: how well it matches images in general) is subtracted,
    # times `prior_weight`, from its log-odds with its own image, relative to the median prior of
    # the held-out human pairs: a text as specific as a human caption keeps its score, one that
    # matches anything (boilerplate, file names) loses it. 0 = off (BLIP's filter).
    prior_images: int = Field(0, ge=0, le=63)  # the bank holds 64: 63 besides a text's own image
    prior_weight: float = Field(0.5, ge=0, le=1)
    # A stricter bar for synthetic captions only, on the filter score (`signal: itm`: p(match),
    # prior-corrected when the prior is on); they face the higher of this and the web texts'
    # threshold, fixed or calibrated; null = the web texts' threshold alone (BLIP).
    synthetic_threshold: float | None = Field(None, ge=0, le=1)
    # Captioner confidence (our addition): a synthetic caption is also removed when the captioner that
    # wrote it gives its tokens a geometric-mean probability below this (teacher-forced, prompt
    # excluded, EOS included; one more decoder pass per caption). null: BLIP's filter alone
    synthetic_confidence: float | None = Field(None, gt=0, lt=1)
    # Filter check (our addition): before the pass, the filter scores held-out human pairs (as for
    # the calibration) and the same texts on other images; the stage stops when the AUROC of its
    # score over the two is below this (a filter that did not learn keeps and drops at random).
    # null: no check
    min_filter_auroc: float | None = Field(None, ge=0, le=1)
    filter_check_pairs: int = Field(500, ge=2)  # human pairs the check scores (and as many mismatched)
    batch_size: int = Field(64, ge=1)  # images per forward
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on a GPU, fp32 on CPU
    seed: int = Field(0, ge=0)  # sampling seed; each image draws from (seed, shard, member)
    merge_timeout_s: int = Field(3600, ge=1)  # rank 0 waits this long for other ranks' parts
    threads: int = Field(0, ge=0)  # torch threads per rank; 0 = cores / ranks
    text: TextInput = TextInput()  # how the filter tokenises web and synthetic texts
    phrases: PhrasesConfig = PhrasesConfig()  # metrics.json `unseen_phrases`
    rounds: int = Field(1, ge=1)  # bootstrap rounds; > 1 adds rounds 3.. in the rounds stage
    rounds_out: str = "outputs/rounds"  # the rounds stage: metrics.json, extra/round<k>/

    @model_validator(mode="after")
    def _threshold_fits_signal(self) -> BootstrapConfig:
        if self.synthetic_threshold is not None and self.signal != "itm":
            raise ValueError(f"synthetic_threshold is a p(match) bar, and signal {self.signal!r} scores are not "
                             "probabilities; set bootstrap.synthetic_threshold: null (or signal: itm)")
        if self.signal != "itm" and self.threshold == "fixed":
            raise ValueError(f"signal {self.signal!r} scores are not probabilities, so a fixed itm_threshold "
                             "cannot apply to them; set threshold: calibrated (or signal: itm)")
        return self


class EvaluateConfig(Section):
    """Round 1 (fine-tunes of `pretrain`) vs round 2 (fine-tunes of `retrain`) on the test set,
    and the filter's quality against the web ground truth when the corpus has one."""

    test_manifest: str = "outputs/ingest/test/manifest.parquet"
    round1_captioner: str = "outputs/finetune/captioner/model"
    round1_filter: str = "outputs/finetune/filter/model"
    round2_captioner: str = "outputs/finetune2/captioner/model"
    round2_filter: str = "outputs/finetune2/filter/model"
    bootstrap: str = "outputs/bootstrap"  # its manifest.parquet and removed.parquet
    web_manifest: str = "outputs/ingest/web/manifest.parquet"
    # training manifests whose images the test images are checked against (sha256): a test image
    # seen in training flatters both rounds; metrics.json's `test_set` counts them
    train_manifests: list[str] = []
    test_scenes: str | None = "data/test"  # synth ground truth (scenes.jsonl); null: real data
    human_scenes: str | None = "data/human"  # synth: which shape-colour pairs human captions show; null: off
    web_truth: str | None = "data/web"  # synth web truth (truth.csv: noise kind per image)
    out: str = "outputs/evaluate"  # metrics.json, plots/, report.html
    num_beams: int = Field(3, ge=1)  # BLIP captioning eval: beam 3
    max_new_tokens: int = Field(16, ge=1)
    min_new_tokens: int = Field(1, ge=0)
    repetition_penalty: float = Field(1.0, gt=0)  # BLIP COCO eval: 1.0
    prompt: str = "a picture of "
    k_test: int = Field(128, ge=1)  # texts/images re-ranked with ITM per query (BLIP: 128/256)
    batch_size: int = Field(64, ge=1)
    grid_images: int = Field(24, ge=0)  # web images shown in report.html
    threads: int = Field(0, ge=0)  # torch threads; 0 = all cores
    text: TextInput = TextInput(max_tokens=35)  # BLIP retrieval eval: max_length 35
    ablation: bool = False  # the ablation stage trains the captioner-only and filter-only corpora
    ablation_out: str = "outputs/ablation"  # the ablation stage: metrics.json, variants/<variant>/
    rounds_out: str = "outputs/rounds"  # the rounds stage's outputs (bootstrap.rounds_out)
    # the draws stage re-trains both rounds at train.seed + 1 .. + draws on the run's corpora; the
    # gain is then also reported as a mean over training draws (components/draws.py); 0 = off
    draws: int = Field(0, ge=0)
    draws_out: str = "outputs/draws"  # the draws stage: metrics.json, chains/seed<s>/round<r>/
    # other bootstrap outputs of the same web set (e.g. `decoding: beam` into another `out`): their
    # synthetic captions' noise ratio is compared with `bootstrap`'s (BLIP's nucleus vs beam table)
    decoding_runs: list[str] = []
    # the gain's interval: test images resampled with replacement, the same draws for both rounds
    # (components/significance.py); 0 resamples = no interval
    resamples: int = Field(2000, ge=0)
    confidence: float = Field(0.95, gt=0, lt=1)
    resample_seed: int = Field(0, ge=0)


# --- the root ---------------------------------------------------------------------------------


class Params(Section):
    """All of params.yaml. A missing section takes its defaults; an unknown one is an error."""

    synth: SynthConfig = SynthConfig()
    train: TrainConfig = TrainConfig()
    model: ModelSection = ModelSection()
    pretrain: PretrainConfig = PretrainConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    retrain: RetrainConfig = RetrainConfig()
    validation: ValidationConfig = ValidationConfig()
    ingest: IngestConfig = IngestConfig()
    bootstrap: BootstrapConfig = BootstrapConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    pipeline: PipelineConfig = PipelineConfig()
    tracking: TrackingConfig = TrackingConfig()
    promote: PromoteConfig = PromoteConfig()


def _format_error(path: Path, err: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in err["loc"]) or "<top level>"
    if err["type"] == "extra_forbidden":
        return f"{path}: {key}: unknown key"
    got = err.get("input")
    shown = repr(got) if not isinstance(got, dict) else "a mapping"
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"{path}: {key}: {err['msg']} (got {shown})"


def parse_params(raw: dict[str, Any], path: Path = DEFAULT_PARAMS) -> Params:
    """Validate an already-parsed params mapping; `path` only names the source in errors."""
    if not isinstance(raw, dict):
        raise CapfiltError(f"{path}: expected a mapping of sections at the top level")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = [_format_error(path, e) for e in exc.errors()]
        raise CapfiltError("invalid parameters:\n  " + "\n  ".join(lines)) from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `raw` with `section.key=value` overrides applied (values parsed as YAML)."""
    out = _deep_copy(raw)
    for item in overrides:
        if "=" not in item:
            raise CapfiltError(f"override {item!r}: expected KEY=VALUE, e.g. synth.n_web=500")
        dotted, value = item.split("=", 1)
        keys = dotted.strip().split(".")
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise CapfiltError(f"override {item!r}: {k} is not a section")
        node[keys[-1]] = yaml.safe_load(value)
    return out


def _deep_copy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in d.items()}


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key given twice in one mapping: PyYAML keeps the last one
    silently, so an edit that duplicates a line would change a parameter without a word."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    lines: dict[Any, int] = {}  # key -> 1-based line of its first use
    for key_node, _ in node.value:
        key, line = loader.construct_object(key_node), key_node.start_mark.line + 1
        try:
            first = lines.get(key)
        except TypeError:  # an unhashable key: construct_mapping names it
            continue
        if first is not None:
            where = f"line {line}" if first == line else f"lines {first} and {line}"
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice ({where})",
                                                    key_node.start_mark)
        lines[key] = line
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def read_raw(path: Path = DEFAULT_PARAMS) -> dict[str, Any]:
    """The raw mapping in a params file; a missing or malformed file is a CapfiltError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CapfiltError(f"{path}: parameters file not found") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as exc:
        raise CapfiltError(f"{path}: not valid YAML: {exc}") from None
    return raw or {}


def load_params(path: Path | str = DEFAULT_PARAMS, overrides: list[str] | None = None) -> Params:
    """Load, override and validate a params file into a frozen `Params`."""
    path = Path(path)
    raw = read_raw(path)
    if overrides:
        raw = apply_overrides(raw, overrides)
    return parse_params(raw, path)

