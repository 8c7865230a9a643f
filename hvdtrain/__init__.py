"""hvdtrain: DALI on WebDataset shards + Horovod data-parallel training."""
