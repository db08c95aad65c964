"""Data stage: find cell images, check them, write the manifest, split it, draw synthetic demo cells."""
