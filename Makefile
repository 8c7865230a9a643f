# hvdtrain: the two commands a newcomer needs are `make sanity` and `make test`.
PY      := .venv/bin/python
HVDRUN  := .venv/bin/horovodrun
NP      ?= 2
ARGS    ?=
# every multi-process test and run is bounded: a hung collective fails, never blocks CI
TIMEOUT ?= 1200

.PHONY: setup sanity test test-unit test-parallel test-e2e bench clean

setup:
	@launch/setup.sh

## set-up, the embedded synthetic data set, then the 2-rank GO/NO-GO run (seed config)
sanity: setup
	timeout -k 30 $(TIMEOUT) $(HVDRUN) -np $(NP) -H localhost:$(NP) $(PY) -m hvdtrain.sanity $(ARGS)

## set-up, then every test: one process, then 2 Horovod ranks, then whole commands
test: setup
	$(MAKE) --no-print-directory test-unit test-parallel test-e2e

test-unit:
	$(PY) -m pytest -q tests/unit

# each rank runs pytest; -x ends the rank at its first failure so horovodrun ends the job
test-parallel:
	timeout -k 30 $(TIMEOUT) $(HVDRUN) -np 2 -H localhost:2 $(PY) -m pytest -q -x -p no:cacheprovider tests/parallel

test-e2e:
	$(PY) -m pytest -q tests/e2e

bench:
	$(PY) -m bench.loader $(ARGS)

clean:
	rm -rf runs .pytest_cache
