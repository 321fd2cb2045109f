"""Image (and text) classifiers: datasets, batch transforms, attacks, ULRL, baselines, evaluation."""
from ..core.requirements import CLASSIFY_PACKAGES, check_versions

check_versions(CLASSIFY_PACKAGES)
