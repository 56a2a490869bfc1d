"""Schemathesis hooks for tests/integration/schemathesis.rs (loaded through SCHEMATHESIS_HOOKS).

Schemathesis draws the optional `Idempotency-Key` header from a small pool of short strings, so
the same key comes back on different requests, and Tollgate rightly refuses every reuse (422)
before the handler runs: most POSTs would test nothing else. Each usable key gets a unique
suffix here; malformed ones (empty, blank) stay as generated. Reuse has its own test
(tests/integration/api.rs).
"""

import uuid

import schemathesis


@schemathesis.hook
def before_call(context, case, kwargs):
    headers = case.headers or {}
    key = headers.get("Idempotency-Key")
    if isinstance(key, str) and key.strip():
        headers["Idempotency-Key"] = f"{key}.{uuid.uuid4().hex}"
