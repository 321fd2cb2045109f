"""Image (and text) classifiers: datasets, batch transforms, attacks, ULRL, baselines, evaluation."""
