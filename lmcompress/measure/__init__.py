"""Measuring what compression cost: perplexity, tasks (mc, qa, retrieval, harness), encoder quality, profile
(params, FLOPs, latency), sweeps, reports, and the one evaluation entry point (``evaluate``)."""
