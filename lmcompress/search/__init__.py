"""Searching compression settings under a budget: a database of every unit compressed at every level
(``database``), the fitness of a candidate against the dense model (``fitness``), and the evolutionary search
of ``lmcompress.algorithms.evolution`` over them. The command line runs it as ``lmcompress search``
(``lmcompress.cli.search``), with ``--budget``, ``--max-loss`` and ``--tune owl``."""
