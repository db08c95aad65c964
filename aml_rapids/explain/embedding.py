"""2-D embeddings of stored features: t-SNE (the published figure) or UMAP of each backbone's features and of a
classifier's PCA space, through the classifier's backend seam (cuML on a GPU, scikit-learn / umap-learn on a
CPU), coloured by class, patient, cohort and split, with their quality measured rather than eyed:
trustworthiness (scikit-learn's) and the kNN class agreement in 2-D next to the same in the space embedded."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..classify.backend import get_backend
from ..classify.data import load_features, select_rows
from ..classify.io import check_store_matches, load_cell_model
from ..config import EmbedConfig, RunConfig
from ..errors import ConfigError
from ..evaluate.report import split_protocol, weights_words
from ..features.store import FeatureStore
from ..logs import say
from ..outputs import atomic_write, atomic_write_text, prepare_fresh_dir
from ..provenance import write_run_record
from .plots import plot_embedding

CLASSIFIER_SPACE = "classifier-pca"
META_COLUMNS = ["cell_id", "label", "patient", "cohort", "split"]


def available_bytes() -> int:
    """Memory this process can still take (MemAvailable), or the machine's total where that is unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_feasible(rows: int, dims: int, settings: EmbedConfig, on_cpu: bool) -> None:
    """Refuse what cannot work before any work: too few rows for the perplexity, or (on a CPU) more rows than
    memory holds (features, t-SNE's neighbour graph, the pairwise distances of the quality sample)."""
    if settings.method == "tsne" and rows < 3 * settings.perplexity + 1:
        raise ConfigError(f"{rows:,} rows are too few for t-SNE with perplexity {settings.perplexity:g}: it needs "
                          f"at least {int(3 * settings.perplexity) + 1}; lower explain.embed.perplexity "
                          f"(to at most {(rows - 1) / 3:.0f}) or embed more rows")
    if settings.method == "umap" and rows <= settings.neighbors:
        raise ConfigError(f"{rows:,} rows are too few for UMAP with {settings.neighbors} neighbours")
    if rows <= 2 * settings.knn:
        raise ConfigError(f"{rows:,} rows are too few to score an embedding with {settings.knn} neighbours "
                          f"(explain.embed.knn): it needs more than {2 * settings.knn}")
    quality = min(rows, settings.quality_rows)
    need = rows * dims * 4 * 3 + rows * 3 * settings.perplexity * 8 * 3 + quality * quality * 8 * 3
    have = available_bytes()
    if on_cpu and need > have:
        raise ConfigError(f"embedding {rows:,} rows of {dims:,} features needs about {need / 2**30:.1f} GiB; this "
                          f"machine has {have / 2**30:.1f} GiB available: lower explain.embed.max_rows or "
                          "explain.embed.quality_rows")


def stratified_rows(rows: pd.DataFrame, max_rows: int, seed: int) -> np.ndarray:
    """Positions of at most ``max_rows`` rows (more only if there are more classes), every class in its share
    and with at least one row, the remainder to the largest fractions; seeded."""
    if len(rows) <= max_rows:
        return np.arange(len(rows))
    groups = list(rows.groupby("label").indices.values())
    sizes = np.array([len(g) for g in groups])
    exact = sizes * max_rows / len(rows)
    counts = np.maximum(1, np.floor(exact)).astype(int)
    for k in np.argsort(-(exact - np.floor(exact)), kind="stable")[:max(0, max_rows - counts.sum())]:
        counts[k] += counts[k] < sizes[k]
    rng = np.random.default_rng(seed)
    return np.sort(np.concatenate([rng.choice(g, n, replace=False) for g, n in zip(groups, counts)]))


def quality(high: np.ndarray, low: np.ndarray, labels: np.ndarray, groups: np.ndarray | None,
            settings: EmbedConfig) -> dict:
    """Trustworthiness of the 2-D map, and the kNN class agreement (cross-validated, folds grouped by patient
    where every row has one) in 2-D and in the space embedded, on a seeded sample of ``quality_rows``."""
    from sklearn.manifold import trustworthiness
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    chosen = stratified_rows(pd.DataFrame({"label": labels}), settings.quality_rows, settings.seed)
    high, low, labels = high[chosen], low[chosen], labels[chosen]
    smallest = pd.Series(labels).value_counts().min()
    folds = min(5, smallest)
    result = {"quality_rows": len(chosen), "knn": settings.knn,
              "trustworthiness": round(float(trustworthiness(high, low, n_neighbors=settings.knn)), 4)}
    if folds < 2:
        return {**result, "knn_folds": None, "knn_agreement_2d": None, "knn_agreement_input": None}
    grouped = groups is not None and len(set(groups[chosen])) >= folds
    splitter = (StratifiedGroupKFold(folds, shuffle=True, random_state=settings.seed) if grouped
                else StratifiedKFold(folds, shuffle=True, random_state=settings.seed))
    knn = KNeighborsClassifier(settings.knn)

    def agreement(space: np.ndarray) -> float:
        return round(float(cross_val_score(knn, space, labels, cv=splitter,
                                           groups=groups[chosen] if grouped else None).mean()), 4)
    return {**result, "knn_folds": f"{folds}-fold, {'patient-grouped' if grouped else 'cells'}",
            "knn_agreement_2d": agreement(low), "knn_agreement_input": agreement(high)}


def embed_space(features: np.ndarray, settings: EmbedConfig, backend: str,
                reduce: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Column z-score and PCA to ``pca_components`` (``reduce``; a classifier's own space is embedded as its
    learners read it), then t-SNE or UMAP: (the space embedded, the 2-D coordinates)."""
    be = get_backend(backend)
    reduced = features.astype(np.float32)
    if reduce:
        z = (features - features.mean(axis=0)) / (features.std(axis=0) + 1e-6)
        components = min(settings.pca_components, *z.shape)
        reduced = be.to_host(be.PCA(n_components=components, **be.pca_options(settings.seed)).fit_transform(
            be.asarray(z))).astype(np.float32)
    options = ({"perplexity": settings.perplexity} if settings.method == "tsne"
               else {"n_neighbors": settings.neighbors, **({"n_jobs": 1} if be.name == "sklearn" else {})})
    coords = be.to_host(be.embedder(settings.method, random_state=settings.seed, **options).fit_transform(
        be.asarray(reduced)))
    return reduced, np.asarray(coords, dtype=np.float32)


@dataclass
class Embedded:
    folder: Path
    rows: int
    spaces: dict  # space -> seconds, trustworthiness, kNN agreement, files


def embed(store_path: Path, out: Path, cfg: RunConfig, backbones: list[str] | None = None,
          model_dir: Path | None = None, overwrite: bool = False) -> Embedded:
    """Embed each chosen backbone's stored features (and, with ``model_dir``, the classifier's PCA space) of a
    class-stratified sample of the store's original cells; coordinates as Parquet beside a PNG/SVG per space."""
    settings = cfg.explain.embed
    store = FeatureStore.open(store_path)
    backbones = backbones or store.backbones
    missing = [b for b in backbones if b not in store.backbones]
    if missing:
        raise ConfigError(f"store {store_path} has no backbone {', '.join(missing)}; it has {', '.join(store.backbones)}")
    model = info = None
    if model_dir is not None:
        model, info = load_cell_model(model_dir, "embed --model")
        check_store_matches(info, store)
    keep, rows = select_rows(store, (settings.split,) if settings.split else None, originals_only=True)
    chosen = stratified_rows(rows, settings.max_rows, settings.seed)
    positions = np.flatnonzero(keep)[chosen]
    keep = np.zeros_like(keep)
    keep[positions] = True
    rows = rows.iloc[chosen].reset_index(drop=True)
    be = get_backend(cfg.classify.backend)
    widths = [store.features(b).shape[1] for b in backbones]
    if info is not None:  # the model's space is read from all its backbones side by side
        widths.append(sum(store.features(b).shape[1] for b in info["backbones"]))
    widest = max(widths)
    check_feasible(len(rows), widest, settings, be.name == "sklearn")
    names = [*backbones, *([CLASSIFIER_SPACE] if model is not None else [])]
    prepare_fresh_dir(out, "embedding folder", [f"{name}-{settings.method}.{ext}" for name in names
                                                for ext in ("parquet", "png", "svg")] + ["embed.json"], overwrite)
    groups = rows["patient"].to_numpy() if (rows["patient"] != "").all() else None
    labels = rows["label"].to_numpy()
    spaces = {b: (lambda b=b: load_features(store, [b], keep)) for b in backbones}
    if model is not None:
        spaces[CLASSIFIER_SPACE] = lambda: model.transform(load_features(store, list(info["backbones"]), keep))
    protocol = split_protocol((store.meta.get("manifests") or [{}])[0].get("split"))
    report = {}
    for space, read in spaces.items():
        started = time.perf_counter()
        features = read()
        reduced, coords = embed_space(features, settings, cfg.classify.backend, reduce=space != CLASSIFIER_SPACE)
        seconds = time.perf_counter() - started
        scores = quality(reduced, coords, labels, groups, settings)
        stem = f"{space}-{settings.method}"
        table = rows[META_COLUMNS].assign(x=coords[:, 0], y=coords[:, 1])
        atomic_write(out / f"{stem}.parquet", lambda tmp: table.to_parquet(tmp, index=False))
        weights = (weights_words(store.meta["backbones"][space]) if space in store.meta["backbones"]
                   else "; ".join(f"{b}: {weights_words(store.meta['backbones'][b])}" for b in info["backbones"]))
        what = (f"{space} features" if space != CLASSIFIER_SPACE
                else f"the classifier's PCA space ({features.shape[1]} components, model {model_dir})")
        title = (f"{settings.method.upper() if settings.method == 'umap' else 't-SNE'} of {what}, {len(rows):,} "
                 f"cells of {settings.split or 'every split'} ({protocol}; store {store_path}); weights: {weights}\n"
                 f"trustworthiness {scores['trustworthiness']} (k={settings.knn}); kNN class agreement "
                 f"{scores['knn_agreement_2d']} in 2-D, {scores['knn_agreement_input']} before "
                 f"({scores['knn_folds']}); {seconds:.1f} s on {be.name}")
        plot_embedding(table, title, out / f"{stem}.png")
        report[space] = {"seconds": round(seconds, 2), **scores,
                         "files": [f"{stem}.parquet", f"{stem}.png", f"{stem}.svg"]}
        say(f"{space}: {settings.method} of {len(rows):,} rows in {seconds:.1f} s ({be.name}); trustworthiness "
            f"{scores['trustworthiness']}, kNN agreement {scores['knn_agreement_2d']} in 2-D vs "
            f"{scores['knn_agreement_input']}")
    summary = {"store": str(store_path), "method": settings.method, "rows": len(rows), "backend": be.name,
               "split": settings.split, "split_protocol": protocol, "spaces": report}
    atomic_write_text(out / "embed.json", json.dumps(summary, indent=2))
    write_run_record(out, "embed", cfg, summary=summary)
    return Embedded(out, len(rows), report)
