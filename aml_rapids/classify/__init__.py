"""Classify stage: row-wise z-score, PCA, and SVM + random-forest stacking on cuML (GPU) or scikit-learn (CPU)."""
