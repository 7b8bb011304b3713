"""Searching compression settings under a budget: a database of every unit compressed at every level
(``database``), the fitness of a candidate against the dense model (``fitness``), and the evolutionary search
of ``lmcompress.algorithms.evolution`` over them. Not yet wired to the CLI (issue 10 is open)."""
