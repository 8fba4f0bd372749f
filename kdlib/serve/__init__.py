"""Serving the merged multi-task model with Ray Serve.

- `model`: the served model (verified load, mixed-task batches on one trunk pass, live-swappable slot);
- `api`: the HTTP contract (settings, request schema, status codes, bearer token);
- `app`: the Serve deployment and its builder `kdlib.serve.app:build_app`;
- `quantize`: int8 dynamic quantization and a float-vs-int8 comparison;
- `loadtest`: a bounded HTTP load test.

Import `kdlib.serve.app` only where Ray Serve runs; the other modules need no Ray.
"""
