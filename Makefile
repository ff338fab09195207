# Two entry points for a fresh machine (see README): `make demo` and `make test`.
.PHONY: demo test test-slow bench

demo:
	scripts/bootstrap.sh test,demo,faiss,serve,onnx,openvino,ray
	.venv/bin/iadkit demo --out demo_out

test:
	scripts/bootstrap.sh test,demo,faiss,serve,onnx,openvino,ray
	.venv/bin/ruff check src tests benchmarks
	.venv/bin/python -m pytest -q --durations=15 tests

test-slow:
	scripts/bootstrap.sh test,demo,faiss,serve,onnx,openvino,ray
	.venv/bin/python -m pytest -q -m slow tests

bench:
	scripts/bootstrap.sh test,demo,faiss,serve,onnx,openvino,ray
	.venv/bin/python benchmarks/patchcore_magnetic_tile.py
