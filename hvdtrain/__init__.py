"""hvdtrain: DALI on WebDataset shards + Horovod data-parallel training."""

__version__ = "0.1.0"  # the one place the version lives (setup.py reads it)
