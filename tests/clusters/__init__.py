"""Test clusters: Slurm on loopback, and hosts in network namespaces."""
