"""Everything lmcompress knows about model families: where blocks, norms and heads live, FFN / attention / MoE
layouts, encoder head classes, shape-changing surgery records, parameter counts, and tiny test models."""
