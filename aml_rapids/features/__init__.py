"""Features stage: backbones from one registry, their weights, the extraction loop and the Zarr feature store."""
