"""Typed run configuration: YAML files validated into pydantic models, with dotted CLI overrides.

The model defaults are the published method's settings; ``configs/default.yaml`` is their YAML form
(``aml-rapids config`` prints it, and a test keeps the two equal).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

from .errors import ConfigError

# torch.compile's modes
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]

MAX_CHUNK_ROWS = 2**16
IMAGE_EXTENSIONS = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class IndexConfig(_Section):
    """How ``index`` finds images and what it checks in each."""

    extensions: tuple[str, ...] = IMAGE_EXTENSIONS
    verify_decode: bool = Field(True, description="decode every image fully, so truncated files are caught")
    label_column: str | None = Field(None, description="CSV column holding the class; None tries label/class/diagnosis")
    patient_column: str | None = Field(None, description="CSV column holding the patient; None tries 'patient'")
    cohort: str | None = Field(None, description="cohort name for every row; None uses the CSV column or the root's name")
    follow_symlinks: bool = True
    workers: int = Field(8, ge=1, description="I/O threads for hashing and header reads")


class SplitConfig(_Section):
    """Which split protocol and its parameters."""

    method: Literal["patient", "image", "kfold", "cohort", "all"] = Field(
        "patient", description="patient / image: train/val/test by fractions; kfold: patient-grouped folds; cohort: "
                               "the named test (and val) cohorts, the rest train; all: every row train (a model "
                               "for deployment, with nothing held out)")
    test_cohorts: tuple[str, ...] = Field((), description="cohort: the cohorts tested on")
    val_cohorts: tuple[str, ...] = Field((), description="cohort: the validation cohorts; none: a val share of the "
                                                         "training cohorts, grouped by patient (by image without "
                                                         "patients)")
    train: float = Field(0.70, gt=0, lt=1)
    val: float = Field(0.15, ge=0, lt=1)
    test: float = Field(0.15, gt=0, lt=1)
    folds: int = Field(5, ge=2)
    seed: int = Field(0, ge=0)
    allow_incomplete: bool = Field(False, description="write a split even if a class is missing from a part")

    @model_validator(mode="after")
    def _fractions_sum_to_one(self) -> "SplitConfig":
        total = self.train + self.val + self.test
        if self.method in ("patient", "image") and abs(total - 1.0) > 1e-6:  # cohort reads val alone
            raise ValueError(f"split fractions train+val+test must sum to 1, got {total:g}")
        if self.method == "cohort" and not self.test_cohorts:
            raise ValueError("split method cohort needs the test cohorts: split.test_cohorts (--test-cohort NAME)")
        both = sorted(set(self.test_cohorts) & set(self.val_cohorts))
        if both:
            raise ValueError(f"cohort(s) {', '.join(both)} named both for test and for val")
        if self.method != "cohort" and (self.test_cohorts or self.val_cohorts):
            raise ValueError(f"split.test_cohorts and split.val_cohorts belong to method cohort, not {self.method}")
        return self

    def fractions(self) -> dict[str, float]:
        parts = {"train": self.train, "val": self.val, "test": self.test}
        return {k: v for k, v in parts.items() if v > 0}


class SegmentationConfig(_Section):
    """HSV thresholds of the background mask. The defaults keep the purple/blue stained leukocyte (hue 195-325
    degrees, saturation >= 0.15) and drop the beige/pink background and red cells (hue 330-60 degrees); chosen on
    ../shared/data (see docs/segmentation.md)."""

    enabled: bool = True
    hue_min: float = Field(195.0, ge=0, le=360)
    hue_max: float = Field(325.0, ge=0, le=360)
    saturation_min: float = Field(0.15, ge=0, le=1)
    value_min: float = Field(0.0, ge=0, le=1)
    value_max: float = Field(1.0, ge=0, le=1)


class ColourJitterConfig(_Section):
    """Colour augmentation of training cells in the DALI graph (its ``color_twist``), drawn per copy like the
    warp: hue turned by up to +-hue_deg, saturation, brightness and contrast scaled by 1 +- their value."""

    enabled: bool = False
    hue_deg: float = Field(8.0, ge=0, le=180)
    saturation: float = Field(0.2, ge=0, lt=1)
    brightness: float = Field(0.15, ge=0, lt=1)
    contrast: float = Field(0.15, ge=0, lt=1)


class StainJitterConfig(_Section):
    """Stain augmentation of training cells in optical-density space (Tellez et al. 2018): each stain of
    scikit-image's ``rgb2hed`` (haematoxylin, eosin, DAB) scaled by 1 +- sigma and shifted by +- bias, per copy."""

    enabled: bool = False
    sigma: float = Field(0.05, ge=0, lt=1)
    bias: float = Field(0.01, ge=0, lt=1)


class StainNormConfig(_Section):
    """Stain normalisation of every cell, in training and prediction alike (Reinhard et al. 2001, in CIELAB): each
    image's mean and standard deviation per L, a, b channel moved to those of a reference image. ``region: image``
    takes them over the whole image: the smear around a cell (red cells, plasma) shows the site's stain and
    light alike for every cell type. ``cell`` takes them over the HSV mask's foreground, which also evens out
    the colour differences between cell types."""

    method: Literal["none", "reinhard"] = "none"
    reference: Optional[str] = Field(None, description="reinhard: the reference image (any cell image file)")
    region: Literal["image", "cell"] = Field("image", description="the pixels whose statistics are matched")
    min_foreground: float = Field(0.05, gt=0, lt=1, description="the least share of the reference image the HSV "
                                                                "mask must keep")

    @field_validator("reference")
    @classmethod
    def _absolute(cls, reference: Optional[str]) -> Optional[str]:
        """As an absolute path (relative ones are to the working directory), so that a model's recorded config
        finds it from anywhere."""
        return str(Path(reference).expanduser().absolute()) if reference else reference

    @model_validator(mode="after")
    def _reference_given(self) -> "StainNormConfig":
        if self.method != "none" and not self.reference:
            raise ValueError(f"stain_norm.method {self.method} needs stain_norm.reference, an image file")
        return self


class AugmentConfig(_Section):
    """Training-time augmentation: one affine warp per image (rotation, independent x/y scale, flips), and
    optionally colour and stain jitter."""

    enabled: bool = True
    rotate_deg: float = Field(10.0, ge=0, le=180)
    p_rotate: float = Field(1.0, ge=0, le=1)
    scale_min: float = Field(0.9, gt=0)
    scale_max: float = Field(1.1, gt=0)
    p_scale: float = Field(1.0, ge=0, le=1)
    p_hflip: float = Field(0.5, ge=0, le=1)
    p_vflip: float = Field(0.5, ge=0, le=1)
    colour: ColourJitterConfig = ColourJitterConfig()
    stain: StainJitterConfig = StainJitterConfig()


class OversampleConfig(_Section):
    """Bring every training class to the size of the largest by replication plus a seeded remainder."""

    enabled: bool = True
    seed: int = Field(0, ge=0)


class LoaderConfig(_Section):
    """The DALI pipeline: where it runs, how big its batches are, what it outputs."""

    device: Literal["auto", "gpu", "cpu"] = "auto"
    image_size: int = Field(224, ge=8)
    batch_size: int = Field(256, ge=1, le=8192)
    num_threads: int | None = Field(None, ge=1, description="DALI CPU threads; None uses every usable core")
    gpu_dtype: Literal["fp16", "bf16", "fp32"] = "fp16"
    prefetch: int = Field(2, ge=1)
    gpu_decode: bool = Field(False, description="on a GPU, DALI's mixed decoder (JPEG decoded on the GPU; TIFF still on "
                                                "CPU threads, and it starts slower); false: the CPU decoder, then one "
                                                "copy to the GPU (docs/loader.md)")
    seed: int = Field(0, ge=0)


Engine = Literal["auto", "torch", "openvino", "onnxruntime", "tensorrt"]
Precision = Literal["auto", "fp32", "bf16", "fp16", "int8", "fp8"]


class BackboneConfig(_Section):
    """One feature extractor: a registry name (``aml-rapids backbones``; any timm model as ``timm:NAME``) and its
    weights (``imagenet`` or ``pretrained``: its published ones; a file path; or ``none``)."""

    name: str
    weights: str = "imagenet"
    engine: Optional[Engine] = Field(None, description="this backbone's engine (null: features.engine)")
    precision: Optional[Precision] = Field(None, description="this backbone's precision (null: features.precision)")


class FeaturesConfig(_Section):
    """Feature extraction into the Zarr store."""

    backbones: list[BackboneConfig] = Field(default_factory=lambda: [
        BackboneConfig(name="mobilenet_v2"), BackboneConfig(name="resnet101"), BackboneConfig(name="vgg16")],
        min_length=1)
    chunk_batches: int = Field(16, ge=1, le=1024,
                               description="loader batches per Zarr chunk (chunks hold whole batches)")
    engine: Engine = Field("auto", description="what runs the backbones: torch, openvino (CPU), onnxruntime, tensorrt "
                                               "(GPU), or auto: the fastest measured here that passes the parity "
                                               "guard (docs/engines.md)")
    precision: Precision = Field("auto", description="fp32, bf16, fp16, int8 (openvino, calibrated), or auto: the "
                                                     "fastest of fp32/bf16/fp16 measured here that passes the guard")
    calibration_cells: int = Field(64, ge=1, le=4096, description="training cells every engine is checked on "
                                                                  "against PyTorch fp32")
    int8_calibration_cells: int = Field(300, ge=1, le=4096, description="training cells NNCF calibrates an int8 "
                                                                        "network on (converted once, then cached)")
    min_cosine: dict[Literal["fp32", "bf16", "fp16", "int8", "fp8"], Annotated[float, Field(gt=0, le=1)]] = Field(
        default_factory=dict, description="the parity guard's threshold per precision where not the documented "
                                          "one (e.g. {bf16: 0.998}): every calibration cell's cosine to PyTorch fp32")
    store_dtype: Literal["float16", "float32"] = Field(
        "float16", description="float16 halves the store; float32 for features outside float16's range")
    channels_last: bool = True
    compile: bool = Field(False, description="torch.compile the backbones (GPU; pays off on large runs)")
    compile_mode: CompileMode = Field(
        "default", description="torch.compile's mode: reduce-overhead replays CUDA graphs on a GPU, max-autotune "
                               "also searches kernel variants (minutes of compiling)")
    writers: int = Field(2, ge=1, description="threads writing finished chunks to the store")
    seed: int = Field(0, ge=0, description="seed of random initialisation for weights 'none'")

    @model_validator(mode="after")
    def _one_entry_per_backbone(self) -> "FeaturesConfig":
        names = [b.name for b in self.backbones]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"features.backbones names {', '.join(twice)} more than once; a store holds one set of "
                             "features per backbone (extract other weights into another store)")
        return self


class ClassifyConfig(_Section):
    """The stacking classifier: PCA per backbone, RBF SVM + random forest, logistic-regression meta-learner."""

    backend: Literal["auto", "cuml", "sklearn"] = "auto"
    zscore: bool = Field(True, description="row-wise z-score of each backbone's features (false: raw features, "
                                           "for the ablation study)")
    pca_components: Union[PositiveInt, Annotated[float, Field(gt=0, lt=1)], None] = Field(
        128, description="PCA components per backbone (an int), or the share of variance to keep (0 to 1); null: no "
                         "PCA, the features go to the learners whole (for the ablation study)")
    pca_mode: Literal["per_backbone", "concatenated"] = Field(
        "per_backbone", description="a PCA per backbone (the method), or one over the backbones side by side")
    learners: tuple[Literal["svm", "forest"], ...] = Field(
        ("svm", "forest"), min_length=1, description="the base learners (the ablation study leaves one out)")
    combine: Literal["stacking", "average"] = Field(
        "stacking", description="stacking: a logistic-regression meta-learner on the learners' out-of-fold outputs "
                                "(the method); average: each learner calibrated by its own, their probabilities "
                                "averaged with equal weight (the ablation's 'without stacking')")
    svm_c: float = Field(1.0, gt=0)
    svm_max_rows: Optional[PositiveInt] = Field(
        None, description="fit each SVM on at most this many rows, a class-stratified seeded sample (null: all; cuML "
                          "has no distributed SVC, and its time grows faster than the rows: docs/scaling.md)")
    rf_trees: int = Field(100, ge=1)
    rf_max_depth: Optional[PositiveInt] = Field(
        16, description="forest depth limit, on both backends (null grows every tree until its leaves are pure; see "
                        "docs/classifier.md)")
    rf_max_samples: float = Field(0.5, gt=0, le=1, description="share of the training rows each tree is grown "
                                                               "on (a bootstrap sample), on both backends; 1 is "
                                                               "MATLAB's and scikit-learn's default (see "
                                                               "docs/classifier.md)")
    folds: int = Field(5, ge=2, description="grouped folds for the meta-learner's out-of-fold inputs")
    seed: int = Field(0, ge=0)
    n_jobs: Optional[PositiveInt] = Field(
        None, description="base learners fitted at once, on threads; null: every core with scikit-learn, 4 "
                          "with cuML (see docs/classifier.md)")
    memory_gb: float = Field(8.0, gt=0, description="training features above this size are streamed from the "
                                                    "store chunk by chunk (incremental PCA) instead of loaded")

    @model_validator(mode="after")
    def _learners_once_each(self) -> "ClassifyConfig":
        if len(set(self.learners)) < len(self.learners):
            raise ValueError(f"classify.learners {list(self.learners)} names a learner twice")
        if self.combine == "average" and len(self.learners) < 2:
            raise ValueError("classify.combine average needs two learners to average; with one, use stacking (its "
                             "meta-learner then calibrates that learner alone)")
        return self


class EvaluateConfig(_Section):
    """How ``evaluate`` and ``cv`` estimate uncertainty, and when they warn that a result rests on too little."""

    bootstrap_samples: int = Field(1000, ge=10, description="bootstrap resamples for the 95% intervals")
    bootstrap_seed: int = Field(0, ge=0)
    min_patients: int = Field(5, ge=1, description="warn when a class has fewer patients than this in the "
                                                  "evaluated rows (patient-level results rest on them)")
    min_positives: int = Field(20, ge=1, description="warn when a class has fewer cells than this in the "
                                                    "evaluated rows (its sensitivity and AUC are then coarse)")


class PatientsConfig(_Section):
    """Patient-level diagnosis from bags of cells (``train --level patient``, ``cv --level patient``): attention
    multiple-instance learning (Ilse et al. 2018) over each backbone's row-z-scored PCA features, trained on
    class-balanced draws of patients with early stopping on patients held out of training."""

    attention: Literal["gated", "per_class"] = Field(
        "gated", description="gated: one gated attention over the cells (Ilse et al.); per_class: one attention "
                             "and one bag embedding per class (as SCEMILA)")
    pca_components: PositiveInt = Field(64, description="PCA components per backbone the model reads")
    hidden: PositiveInt = Field(128, description="width of each cell's embedding")
    attention_hidden: PositiveInt = Field(64, description="width of the attention network")
    dropout: float = Field(0.25, ge=0, lt=1)
    lr: float = Field(5e-4, gt=0, description="Adam")
    weight_decay: float = Field(1e-4, ge=0)
    epochs: PositiveInt = Field(100, description="at most")
    patience: PositiveInt = Field(15, description="epochs without a lower validation loss before stopping")
    ensemble: PositiveInt = Field(5, description="networks averaged, each stopped early on its own fold of the "
                                                 "training patients (with a val split: on it, by seed)")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="with ensemble 1 and no val split: the share of the "
                                                             "training patients held out for early stopping")
    batch_patients: PositiveInt = Field(4, description="bags per optimiser step (padded, masked)")
    max_cells: Optional[PositiveInt] = Field(
        512, description="cells drawn from a bag at each training step (null: all); prediction reads every cell")
    include_augmented: bool = Field(False, description="augmented copies of cells in the bags (false: originals)")
    dedupe: bool = Field(True, description="one cell per content within a patient (byte-identical files once)")
    quantiles: tuple[Annotated[float, Field(gt=0, lt=1)], ...] = Field(
        (0.5, 0.9), description="baselines of cv --level patient: these quantiles of the cells' class scores, "
                                "besides their mean")
    top_cells: PositiveInt = Field(8, description="most attended cells listed per patient by predict")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: the GPU when there is one")
    memory_gb: float = Field(4.0, gt=0, description="on a CPU, the most a training step may hold (a GPU: its free "
                                                    "memory); larger bags x batch are refused")
    seed: int = Field(0, ge=0, description="initialisation, the validation patients, sampling and dropout")


class FinetuneConfig(_Section):
    """Fine-tuning a registry network with a new head (``aml-rapids finetune``). The defaults are the published
    training policy (Adam, learning rate 1e-4, mini-batches of 32, at most 50 epochs, reshuffled every epoch,
    validated every 30 mini-batches on augmented validation images, the best validation kept); the schedules,
    weight decay, label smoothing and early stopping are off (the paper names no patience; MATLAB's default has
    none)."""

    backbone: str = Field("mobilenet_v2", description="registry name of the network to fine-tune")
    weights: str = Field("imagenet", description="the weights it starts from: imagenet (or pretrained: the "
                                                 "network's published ones), a file, or none")
    epochs: int = Field(50, ge=1, description="at most; may grow when a run resumes (not with lr_schedule: cosine)")
    batch_size: int = Field(32, ge=2, le=4096)
    lr: float = Field(1e-4, gt=0)
    val_every: int = Field(30, ge=1, description="mini-batches between validations (and after each epoch)")
    val_max_rows: Optional[PositiveInt] = Field(
        None, description="validate on a fixed class-stratified sample of this many validation cells (null: all)")
    patience: Optional[PositiveInt] = Field(
        None, description="stop after this many validations without a lower validation loss (null: never)")
    freeze_epochs: int = Field(0, ge=0, description="epochs in which only the new head trains")
    unfreeze: Literal["all", "last_block"] = Field(
        "all", description="what trains after them: the whole network, or the last convolutional block and after")
    lr_schedule: Literal["constant", "cosine"] = Field("constant", description="cosine: decay to 0 over the epochs")
    weight_decay: float = Field(0.0, ge=0, description="Adam's L2 penalty")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on a GPU; on a CPU bf16 where a probe of the network measured it "
                            ">= 1.1x as fast as fp32, else fp32")
    checkpoint_every: Optional[PositiveInt] = Field(
        None, description="mini-batches between checkpoints besides each epoch's end (null: epoch ends only)")
    max_steps: Optional[PositiveInt] = Field(None, description="stop after this many mini-batches (smoke runs)")
    seed: int = Field(0, ge=0, description="head initialisation, shuffling, augmentation and dropout")


class GradcamConfig(_Section):
    """Which cells ``gradcam`` and ``occlusion`` explain, and for which class."""

    split: str = Field("test", description="the manifest split the cells come from (all: every cell)")
    cells_per_class: int = Field(25, ge=1, description="a seeded sample of this many cells of every class")
    show_per_class: int = Field(4, ge=1, description="cells of each class drawn in the grid (all are computed)")
    target: Literal["predicted", "true"] = Field("predicted", description="the class whose evidence is mapped")
    batch_size: int = Field(16, ge=1, le=1024)
    sanity: bool = Field(True, description="also map with the network's weights re-initialised (the head kept) "
                                           "and report the rank correlation (Adebayo et al. 2018)")
    seed: int = Field(0, ge=0, description="the cell sample and the re-initialised weights")


class OcclusionConfig(_Section):
    """Occlusion sensitivity: a window of the cell set to the segmentation's black background, slid over it."""

    window: int = Field(32, ge=2, description="side of the occluding square, in pixels of the network's input")
    stride: int = Field(16, ge=1)
    rows_per_pass: int = Field(256, ge=1, description="occluded copies x cells sent through the networks at once")

    @model_validator(mode="after")
    def _stride_within_window(self) -> "OcclusionConfig":
        if self.stride > self.window:
            raise ValueError(f"explain.occlusion.stride {self.stride} > window {self.window}: pixels between windows "
                             "would never be occluded")
        return self


class EmbedConfig(_Section):
    """2-D embeddings of stored features (``embed``): t-SNE as published, or UMAP."""

    method: Literal["tsne", "umap"] = "tsne"
    max_rows: PositiveInt = Field(10_000, description="a class-stratified seeded sample of the original cells")
    split: Optional[str] = Field(None, description="only this split's cells (null: every split)")
    pca_components: PositiveInt = Field(50, description="t-SNE / UMAP run on this many principal components")
    perplexity: float = Field(30.0, gt=0, description="t-SNE; needs at least 3 x perplexity + 1 rows")
    neighbors: int = Field(15, ge=2, description="UMAP's n_neighbors")
    quality_rows: PositiveInt = Field(5_000, description="rows the trustworthiness and kNN scores are computed on")
    knn: int = Field(5, ge=1, description="neighbours of the trustworthiness and the kNN class agreement")
    seed: int = Field(0, ge=0)


class GalleryConfig(_Section):
    """Cell galleries from a prediction table (``gallery``)."""

    per_class: int = Field(6, ge=1, description="most confident correct and most confident wrong cells per class")
    patients: int = Field(12, ge=0, description="patients shown (wrongly called first), with their top cells")
    per_patient: int = Field(6, ge=1)


class ExplainConfig(_Section):
    """Explanation: Grad-CAM, occlusion of the hybrid, embeddings, galleries."""

    gradcam: GradcamConfig = GradcamConfig()
    occlusion: OcclusionConfig = OcclusionConfig()
    embed: EmbedConfig = EmbedConfig()
    gallery: GalleryConfig = GalleryConfig()


class DriftConfig(_Section):
    """How ``drift`` (and ``predict``) tell whether a new cohort looks unlike the training data (docs/drift.md)."""

    pca_components: PositiveInt = Field(32, description="PCA components of each backbone's features that the "
                                                        "domain classifier and the MMD test read")
    folds: int = Field(5, ge=2, description="patient-grouped folds of the domain classifier's AUROC")
    max_cells: PositiveInt = Field(3000, description="cells drawn from each cohort (seeded)")
    permutations: PositiveInt = Field(200, description="permutations of the MMD test's p-value")
    auroc_threshold: float = Field(0.75, gt=0.5, lt=1, description="flag drift when a backbone's domain AUROC "
                                                                   "reaches this")
    colour_cells: PositiveInt = Field(300, description="cells per cohort whose images give the colour statistics")
    seed: int = Field(0, ge=0)


class SlurmConfig(_Section):
    """The batch jobs ``cluster: slurm`` submits through dask-jobqueue, each running Dask workers."""

    queue: Optional[str] = Field(None, description="partition (null: the site's default)")
    account: Optional[str] = None
    walltime: str = Field("02:00:00", description="each job's time limit")
    cores: PositiveInt = Field(8, description="CPU cores per job")
    memory: str = Field("64GiB", description="memory per job")
    gpus: int = Field(1, ge=0, description="GPUs per job (--gres=gpu:N); one worker per GPU")
    job_extra_directives: list[str] = Field(default_factory=list, description="more #SBATCH lines, e.g. --constraint=a100")
    interface: Optional[str] = Field(None, description="network interface the scheduler and workers talk on, e.g. "
                                                       "ib0 (null: Dask's choice)")


class ScaleConfig(_Section):
    """Where extraction and the classifier's fits run: this process (``none``), or a Dask cluster. Extraction is
    cut into units of whole store chunks, each extracted and written by one worker; the fits become Dask tasks."""

    cluster: Literal["none", "local", "local-cuda", "scheduler-file", "slurm"] = Field(
        "none", description="none: this process; local: CPU worker processes on this machine; local-cuda: one worker "
                            "per visible GPU (dask-cuda); scheduler-file: join a running cluster; slurm: dask-jobqueue")
    scheduler_file: Optional[str] = Field(None, description="cluster: scheduler-file: the file `dask scheduler "
                                                            "--scheduler-file` wrote (on shared storage)")
    workers: Optional[PositiveInt] = Field(None, description="local: worker processes (null: usable cores); "
                                                             "local-cuda: GPUs (null: every visible one); slurm: jobs")
    threads_per_worker: PositiveInt = Field(1, description="local and local-cuda: threads of each worker")
    memory_per_worker: str = Field("auto", description="local and local-cuda: each worker's memory limit (auto: "
                                                        "the machine's memory shared out), e.g. 16GiB")
    unit_chunks: PositiveInt = Field(1, description="whole store chunks in one unit of extraction work")
    connect_timeout_s: float = Field(60.0, gt=0, description="how long to wait for a scheduler or for the workers")
    slurm: SlurmConfig = SlurmConfig()

    @field_validator("memory_per_worker", mode="before")
    @classmethod
    def _a_size(cls, value):
        text = str(value).strip()
        if not re.fullmatch(r"auto|\d+(\.\d+)?\s*([kKMGT]i?B|B)?", text):
            raise ValueError(f"{value!r} is neither auto nor a size such as 16GiB or 500MB")
        return text

    @model_validator(mode="after")
    def _scheduler_file_given(self) -> "ScaleConfig":
        if self.cluster == "scheduler-file" and not self.scheduler_file:
            raise ValueError("cluster scheduler-file needs scale.scheduler_file: the file `dask scheduler "
                             "--scheduler-file PATH` wrote")
        return self


class RunConfig(_Section):
    """Everything one run needs; each stage reads its own section."""

    index: IndexConfig = IndexConfig()
    split: SplitConfig = SplitConfig()
    segmentation: SegmentationConfig = SegmentationConfig()
    stain_norm: StainNormConfig = StainNormConfig()
    augment: AugmentConfig = AugmentConfig()
    oversample: OversampleConfig = OversampleConfig()
    loader: LoaderConfig = LoaderConfig()
    features: FeaturesConfig = FeaturesConfig()
    classify: ClassifyConfig = ClassifyConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    patients: PatientsConfig = PatientsConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    explain: ExplainConfig = ExplainConfig()
    drift: DriftConfig = DriftConfig()
    scale: ScaleConfig = ScaleConfig()

    @model_validator(mode="after")
    def _stain_settings_agree(self) -> "RunConfig":
        if self.stain_norm.method != "none" and self.stain_norm.region == "cell" and not self.segmentation.enabled:
            raise ValueError("stain_norm.region cell takes the statistics over the HSV mask's foreground, and "
                             "segmentation.enabled is false: use region image, or enable segmentation")
        jitter = [f"augment.{name}" for name in ("colour", "stain") if getattr(self.augment, name).enabled]
        if jitter and not self.augment.enabled:
            raise ValueError(f"{' and '.join(jitter)} enabled while augment.enabled is false, which turns every "
                             "training augmentation off: enable augment, or disable them")
        return self

    @model_validator(mode="after")
    def _chunks_fit_in_memory(self) -> "RunConfig":
        if self.chunk_rows > MAX_CHUNK_ROWS:
            raise ValueError(f"features.chunk_batches x loader.batch_size = {self.chunk_rows:,} rows a chunk; at most "
                             f"{MAX_CHUNK_ROWS:,} (a chunk is held in memory while it fills)")
        return self

    @property
    def chunk_rows(self) -> int:
        """Rows per feature-store chunk: whole loader batches, so a resumed run sees the same batches."""
        return self.features.chunk_batches * self.loader.batch_size


def as_overrides(values: dict) -> list[str]:
    """``{"split.seed": 3}`` as the ``--set`` items ``["split.seed=3"]`` (values as JSON, which YAML reads, so a
    string stays a string)."""
    return [f"{key}={json.dumps(value)}" for key, value in values.items()]


def validation_problems(exc: ValidationError) -> str:
    """A pydantic error as one line: ``section.key: message; ...``."""
    return "; ".join(": ".join(filter(None, [".".join(map(str, e["loc"])), e["msg"]])) for e in exc.errors())


def _set_dotted(tree: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
    node[keys[-1]] = value


def parse_overrides(overrides: list[str] | None) -> dict:
    """Turn ``["split.seed=3", "index.verify_decode=false"]`` into a nested dict (values parsed as YAML)."""
    tree: dict = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: its value is not YAML ({str(exc).splitlines()[0]}); quote a value "
                              "holding ':' or ',' (name: 'timm:hf-hub:org/repo')") from None
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(path: Path | None = None, overrides: list[str] | None = None, base: dict | None = None) -> RunConfig:
    """Read a YAML config (or the built-in defaults, or ``base``, e.g. the config a model was made with), apply
    overrides, validate; errors name the file and key."""
    tree: dict = dict(base or {})
    source = "built-in defaults" if base is None else "the model's config"
    if path is not None:
        source = str(path)
        try:
            tree = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path} cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(tree).__name__}")
        tree = _merge(dict(base or {}), tree)
    tree = _merge(tree, parse_overrides(overrides))
    if overrides:
        source += " with " + " ".join(f"--set {item}" for item in overrides)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(f"invalid config ({source}): {validation_problems(exc)}") from None


def dump_config(config: RunConfig) -> str:
    """The YAML text of a resolved config, the form written into every run folder."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
