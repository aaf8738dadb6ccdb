"""One spec per method: the single source of the student notebooks and their solutions (see ``build.py``)."""

from . import cluster, efficient, flip, qformer, tip

ALL = (flip.NOTEBOOK, cluster.NOTEBOOK, qformer.NOTEBOOK, efficient.NOTEBOOK, tip.NOTEBOOK)
