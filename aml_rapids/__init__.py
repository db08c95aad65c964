"""aml-rapids: GPU-accelerated feature store and stacking classifier for single-cell AML images.

What a notebook needs, importable from the package (each loaded on first use, so ``import aml_rapids`` stays
quick)::

    import aml_rapids
    result = aml_rapids.run("cells/", out="runs/cells")   # index -> split -> extract -> train -> evaluate
    store = aml_rapids.open_store("runs/cells/features.zarr")
    model, info = aml_rapids.load_model("runs/cells/model")
    from aml_rapids import workflow                        # each stage: workflow.index, .split, .finetune, ...

docs/python-api.md walks through it.
"""

__version__ = "0.9.0"

_EXPORTS = {
    # the pipeline in one call, and predicting with a model (stage by stage: aml_rapids.workflow)
    **{name: "workflow" for name in ("run", "predict", "demo_data")},
    "RunConfig": "config", "load_config": "config",
    "read_manifest": "data.manifest",
    "list_backbones": "features.weights",
    "open_store": "features.store",
    "load_model": "classify.io",
    "run_records": "provenance",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str):
    from importlib import import_module

    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'aml_rapids' has no attribute {name!r}")
