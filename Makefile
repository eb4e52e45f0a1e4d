# The two set-up commands of the README: `make run` and `make test`. Both install what is missing first.
# `make install GPU=1` installs the GPU build (torch with CUDA, faiss-gpu) on a host with NVIDIA GPUs.
.PHONY: install run test bench samples weights clean

GPU ?= 0

install:
	@GPU=$(GPU) bash deploy/install.sh

run: install
	.venv/bin/lookalike run

test: install
	.venv/bin/python -m pytest -q -rs

bench: install
	.venv/bin/python bench/cstore_throughput.py
	.venv/bin/python bench/store_to_searchable.py
	.venv/bin/python bench/worker_embed_rate.py

samples: install
	.venv/bin/lookalike samples --data ../shared/data --out deploy/samples

clean:
	rm -rf var deploy/local
