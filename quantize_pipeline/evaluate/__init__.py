"""The evaluate stage: lm-eval tasks, base vs quantized, the base's cached answers, divergence and perplexity;
what it produces, typed (record.py: Evaluation, evaluate.json)."""
