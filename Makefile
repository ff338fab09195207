# Two entry points for a fresh machine (see README): `make demo` and `make test`.
.PHONY: demo test test-slow bench

demo:
	scripts/bootstrap.sh test,demo,faiss,serve,onnx,openvino,ray
	.venv/bin/iadkit demo --out demo_out

# The tests run on two workers (pytest-xdist), one thread each, a test file per worker at a
# time: the suite waits on child processes much of the time, and one thread per process
# avoids OpenMP threads spinning against them (tests/conftest.py).
test:
	scripts/bootstrap.sh test,demo,faiss,serve,onnx,openvino,ray
	.venv/bin/ruff check src tests benchmarks
	.venv/bin/python -m pytest -q -n 2 --dist loadfile --durations=15 tests

test-slow:
	scripts/bootstrap.sh test,demo,faiss,serve,onnx,openvino,ray
	.venv/bin/python -m pytest -q -m slow tests

bench:
	scripts/bootstrap.sh test,demo,faiss,serve,onnx,openvino,ray
	.venv/bin/python benchmarks/patchcore_magnetic_tile.py
