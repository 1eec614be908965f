"""The benchmark scripts (``python bench/kernels.py``, ``python bench/models.py``), installed as
``attncore.bench`` so that ``attncore bench`` runs them from an installed package."""
