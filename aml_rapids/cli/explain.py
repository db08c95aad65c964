"""Commands that explain: gradcam, occlusion, embed, gallery."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._common import ConfigOpt, ModelArg, OverwriteOpt, SetOpt, StoreArg, command, from_config, out_option, resolve_config

SourceArg = Annotated[Path, typer.Argument(
    metavar="SOURCE", show_default=False,
    help="manifest.parquet (its split column picks the cells), or a folder or CSV of images.")]
SplitOpt = Annotated[Optional[str], typer.Option(
    metavar="SPLIT", show_default=from_config("explain.gradcam.split"), help="The split the cells come from (all: any).")]
CellsOpt = Annotated[Optional[int], typer.Option(
    "--cells-per-class", metavar="N", show_default=from_config("explain.gradcam.cells_per_class"),
    help="A seeded sample of N cells of every class.")]
TargetOpt = Annotated[Optional[str], typer.Option(
    metavar="predicted|true", show_default=from_config("explain.gradcam.target"), help="The class each map explains.")]


def _cells_config(config, set_, split, target, cells_per_class):
    """The config with the options that choose the cells and the class to map."""
    return resolve_config(config, set_, **{"explain.gradcam.split": split, "explain.gradcam.target": target,
                                           "explain.gradcam.cells_per_class": cells_per_class})


def register(app: typer.Typer) -> None:
    @command(app)
    def gradcam(
        network: Annotated[Path, typer.Argument(
            metavar="CHECKPOINT_OR_STORE", show_default=False,
            help="A fine-tuning folder or its best.pt (its own head), or a feature store (a linear probe fitted on "
                 "the backbone's stored train rows).")],
        source: SourceArg,
        out: Annotated[Path, out_option("required", "Grad-CAM folder")],
        backbone: Annotated[Optional[str], typer.Option(
            metavar="NAME", show_default="the store's only backbone, or the checkpoint's",
            help="Which backbone of the store to explain.")] = None,
        split: SplitOpt = None, cells_per_class: CellsOpt = None, target: TargetOpt = None,
        overwrite: OverwriteOpt = False, config: ConfigOpt = None, set_: SetOpt = None,
    ):
        """Grad-CAM of one backbone at its registry layer (a ViT: its last block's norm, patch grid) on a seeded
        per-class sample of cells: maps.npy, cells.csv (per cell: the pointing ratio, the rank correlation with a
        re-initialised network), summary.json (per class) and gradcam.png/.svg."""
        from ..explain.gradcam import gradcam as run

        return run(network, source, out, _cells_config(config, set_, split, target, cells_per_class), backbone,
                   overwrite)

    @command(app)
    def occlusion(
        model: ModelArg,
        source: SourceArg,
        out: Annotated[Path, out_option("required", "Occlusion folder")],
        against: Annotated[Optional[Path], typer.Option(
            metavar="GRADCAM_DIR", show_default="none",
            help="Occlude the cells of this Grad-CAM run, for its target classes, and report the rank correlation "
                 "of the two maps.")] = None,
        split: SplitOpt = None, cells_per_class: CellsOpt = None, target: TargetOpt = None,
        overwrite: OverwriteOpt = False, config: ConfigOpt = None, set_: SetOpt = None,
    ):
        """Occlusion sensitivity of the hybrid classifier: the drop in its class probability as a black square
        (the segmentation's background) slides over the cell, every occluded copy through all its backbones at
        once. Writes maps.npy, cells.csv, summary.json and occlusion.png/.svg."""
        from ..explain.occlusion import occlusion as run

        return run(model, source, out, _cells_config(config, set_, split, target, cells_per_class), against,
                   overwrite)

    @command(app)
    def embed(
        store: StoreArg,
        out: Annotated[Optional[Path], out_option("embed-<method> beside the store", "Embedding folder")] = None,
        backbone: Annotated[Optional[list[str]], typer.Option(
            metavar="NAME", show_default="every backbone of the store", help="Backbone to embed (repeatable).")] = None,
        model: Annotated[Optional[Path], typer.Option(
            metavar="MODEL", show_default="none", help="Also embed this model's PCA space (the space its SVM and "
                                                        "forest read).")] = None,
        method: Annotated[Optional[str], typer.Option(
            metavar="tsne|umap", show_default=from_config("explain.embed.method"),
            help="t-SNE (the published figure) or UMAP.")] = None,
        max_rows: Annotated[Optional[int], typer.Option(
            metavar="N", show_default=from_config("explain.embed.max_rows"),
            help="A class-stratified seeded sample of the store's original cells.")] = None,
        overwrite: OverwriteOpt = False, config: ConfigOpt = None, set_: SetOpt = None,
    ):
        """t-SNE or UMAP of stored features (cuML on a GPU, scikit-learn / umap-learn on a CPU), coloured by class,
        patient, cohort and split; coordinates as Parquet beside each PNG/SVG, and their trustworthiness and kNN
        class agreement in embed.json."""
        from ..explain.embedding import embed as run

        cfg = resolve_config(config, set_, **{"explain.embed.method": method, "explain.embed.max_rows": max_rows})
        folder = out or Path(store).parent / f"embed-{cfg.explain.embed.method}"
        return run(store, folder, cfg, backbone, model, overwrite)

    @command(app)
    def gallery(
        predictions: Annotated[Path, typer.Argument(
            metavar="PREDICTIONS", show_default=False,
            help="An evaluation or prediction folder, or its predictions.csv.")],
        manifest: Annotated[Path, typer.Argument(
            metavar="MANIFEST", show_default=False, help="The manifest the cells were indexed in (their images).")],
        out: Annotated[Optional[Path], out_option("gallery beside the predictions", "Gallery folder")] = None,
        overwrite: OverwriteOpt = False, config: ConfigOpt = None, set_: SetOpt = None,
    ):
        """Cell galleries: per class the most confident correct and wrong cells (classes.png), per patient the
        cells that push its call most (patients.png), every tile titled with cell id, true and predicted class
        and probability; gallery.csv lists them."""
        from ..explain.gallery import gallery as run

        folder = Path(predictions) if Path(predictions).is_dir() else Path(predictions).parent
        return run(predictions, manifest, out or folder / "gallery", resolve_config(config, set_), overwrite)
