"""Generative language models: Alpaca data, poisoning, backdoor SFT, CROW, baselines, evaluation."""
