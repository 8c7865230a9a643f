# hvdtrain: the two commands a newcomer needs are `make sanity` and `make test`.
SHELL         := /bin/bash
.SHELLFLAGS   := -o pipefail -c
PY      := .venv/bin/python
HVDRUN  := .venv/bin/horovodrun
NP      ?= 2
ARGS    ?=
# every multi-process test and run is bounded: a hung collective fails, never blocks CI
TIMEOUT ?= 1200
# --gloo: make setup builds Horovod with Gloo only; without the flag horovodrun first forks a
# process that imports torch to ask whether MPI is built (3.4 s per launch on 2 cores)

.PHONY: setup sanity test test-unit test-parallel test-e2e test-slurm bench gpu-check clean

# EXTRAS=remote: the clients for s3:// and gs:// data; `make test` adds the test servers too
EXTRAS  ?=
setup:
	@HVDTRAIN_EXTRAS="$(EXTRAS)" install/setup.sh

## set-up, the embedded synthetic data set, then the 2-rank GO/NO-GO run (the sanity preset);
## horovodrun's "[rank]<stdout>:" prefixes (also after a progress bar's \r) are taken off so the report reads as it is
## written to runs/<run-id>/sanity.md (the exit status is horovodrun's: pipefail)
sanity: setup
	timeout -k 30 $(TIMEOUT) $(HVDRUN) --gloo -np $(NP) -H localhost:$(NP) $(PY) -m hvdtrain.sanity $(ARGS) 2>&1 \
		| sed -u -E 's/(^|\r)\[[0-9]+\]<std(out|err)>:/\1/g'

## set-up, then every test: one process, 2 Horovod ranks, whole commands, a real Slurm cluster;
## it stops at the first room that fails, and ends with each room's time
test:
	@t_all=$$(date +%s); rc=0; times=""; \
	for room in setup test-unit test-parallel test-e2e test-slurm; do \
		t0=$$(date +%s); $(MAKE) --no-print-directory $$room EXTRAS="$(EXTRAS) remote test" || rc=$$?; \
		times="$$times$$(printf '\n  %-14s %5d s  %s' $$room $$(( $$(date +%s) - t0 )) $$([ $$rc = 0 ] && echo passed || echo FAILED))"; \
		[ $$rc = 0 ] || break; \
	done; \
	printf 'make test: the rooms, in order%s\n  %-14s %5d s  %s\n' "$$times" total $$(( $$(date +%s) - t_all )) \
		$$([ $$rc = 0 ] && echo passed || echo FAILED); \
	exit $$rc

# tests/gpu: skipped with the reason on a machine with no GPU (HVDTRAIN_REQUIRE_GPU=1 makes them required)
test-unit:
	$(PY) -m pytest -q tests/unit tests/gpu

# each rank runs pytest; -x ends the rank at its first failure so horovodrun ends the job.
# The CPU path, GPUs hidden: two ranks on a one-GPU machine would stop in dist.init (one
# rank per GPU); make gpu-check runs the GPU path
test-parallel:
	CUDA_VISIBLE_DEVICES= timeout -k 30 $(TIMEOUT) $(HVDRUN) --gloo -np 2 -H localhost:2 $(PY) -m pytest -q -x -p no:cacheprovider tests/parallel

test-e2e:
	$(PY) -m pytest -q --durations=10 tests/e2e

# a one-node Slurm cluster on loopback (apt-get installs Debian's packages if missing;
# HVDTRAIN_SKIP_SLURM=1 leaves this room out and says so)
test-slurm:
ifeq ($(HVDTRAIN_SKIP_SLURM),1)
	@echo "test-slurm: SKIPPED (HVDTRAIN_SKIP_SLURM=1): the sbatch scripts were not tested"
else
	tests/clusters/install_slurm.sh
	$(PY) -m pytest -q --durations=10 tests/slurm
endif

bench:
	$(PY) -m bench.loader $(ARGS)

## is this GPU node healthy and fast? GPU tests, sanity, loader, train and kernel figures
## against their targets, reported in runs/gpu-check-<id>/gpu-check.md (ARGS="--out DIR": another
## folder; ARGS=--dry-run: the plan; exit 2 with no GPU). A node without internet access:
## install/offline_check.sh --out DIR (docs/gpu-check.md)
gpu-check: setup
	$(PY) -m gpucheck $(ARGS)

clean:
	rm -rf runs .pytest_cache
