# The two set-up commands of the README: `make run` and `make test`. Both install what is missing first.
.PHONY: install run test bench samples weights clean

install:
	@bash deploy/install.sh

run: install
	.venv/bin/lookalike run

test: install
	.venv/bin/python -m pytest -q -rs

bench: install
	.venv/bin/python bench/cstore_throughput.py
	.venv/bin/python bench/store_to_searchable.py

samples: install
	.venv/bin/lookalike samples --data ../shared/data --out deploy/samples

clean:
	rm -rf var deploy/local
