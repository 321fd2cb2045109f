"""Generative language models: Alpaca data, poisoning, backdoor SFT, CROW, baselines, evaluation."""
from ..core.requirements import LM_PACKAGES, check_versions

check_versions(LM_PACKAGES)  # an older transformers would train silently differently: refuse it here
