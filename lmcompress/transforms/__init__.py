"""The compressions, each ``Config → fn(model, config, calib) → Report``, changing the model in place:
``prune`` (unstructured / N:M / OWL / joint), ``quantize`` (RTN, GPTQ), ``shrink`` (FFN channels, heads),
``experts`` (drop MoE experts), ``factorize`` (low-rank)."""
