"""Explanation: Grad-CAM of each backbone (through a fine-tuned head or a linear probe on stored features),
occlusion maps of the hybrid classifier, 2-D embeddings of the store, and galleries of cells."""
