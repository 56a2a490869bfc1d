"""Webhook signature vectors from Stripe's official `stripe` package.

Prints a JSON list of cases: a payload, a secret, a `Stripe-Signature` header, the time the
check is made at, and whether `stripe.WebhookSignature.verify_header` (tolerance 300 s)
accepts it. Tollgate's verifier must agree on every case (tests/integration/python/stripe_signatures.rs).
"""

import json
import time

import stripe
from stripe import WebhookSignature

SECRET = "whsec_test_" + "a1b2c3d4e5f6" * 3
OLD_SECRET = "whsec_test_old_" + "0f" * 12
PAYLOAD = json.dumps(
    {
        "id": "evt_1QaZ",
        "object": "event",
        "type": "invoice.paid",
        "data": {"object": {"id": "in_1", "object": "invoice", "status": "paid", "amount_paid": 1234}},
    },
    separators=(",", ":"),
)
UNICODE_PAYLOAD = json.dumps({"id": "evt_2", "customer_name": "Zoë Ångström — 東京"}, ensure_ascii=False)


def header(payload, secret, timestamp):
    return WebhookSignature.generate_signature_header(payload, secret, timestamp=timestamp)


def v1(payload, secret, timestamp):
    return WebhookSignature._compute_signature(f"{timestamp}.{payload}", secret)


def accepts(payload, sig_header, secret, now):
    real_time = time.time
    time.time = lambda: now  # verify_header reads the clock; pin it to the case's time
    try:
        WebhookSignature.verify_header(payload, sig_header, secret, tolerance=300)
        return True
    except stripe.SignatureVerificationError:
        return False
    finally:
        time.time = real_time


now = int(time.time())
cases = []


def case(name, payload, secret, sig_header, at=now):
    cases.append(
        {
            "name": name,
            "payload": payload,
            "secret": secret,
            "header": sig_header,
            "now": at,
            "stripe_accepts": accepts(payload, sig_header, secret, at),
        }
    )


case("valid", PAYLOAD, SECRET, header(PAYLOAD, SECRET, now))
case("valid, 299 s old", PAYLOAD, SECRET, header(PAYLOAD, SECRET, now - 299))
case("expired, 301 s old", PAYLOAD, SECRET, header(PAYLOAD, SECRET, now - 301))
case("expired, a day old", PAYLOAD, SECRET, header(PAYLOAD, SECRET, now - 86400))
case("tampered body", PAYLOAD.replace("1234", "1"), SECRET, header(PAYLOAD, SECRET, now))
case("tampered timestamp", PAYLOAD, SECRET, f"t={now - 1},v1={v1(PAYLOAD, SECRET, now)}")
case("wrong secret", PAYLOAD, SECRET, header(PAYLOAD, "whsec_someone_else", now))
case(
    "several v1, the last valid (secret being rolled)",
    PAYLOAD,
    SECRET,
    f"t={now},v1={v1(PAYLOAD, OLD_SECRET, now)},v1={v1(PAYLOAD, SECRET, now)}",
)
case(
    "several v1, the first valid",
    PAYLOAD,
    SECRET,
    f"t={now},v1={v1(PAYLOAD, SECRET, now)},v1={v1(PAYLOAD, OLD_SECRET, now)}",
)
case(
    "several v1, none valid",
    PAYLOAD,
    SECRET,
    f"t={now},v1={v1(PAYLOAD, OLD_SECRET, now)},v1={'0' * 64}",
)
case("v0 only", PAYLOAD, SECRET, f"t={now},v0={v1(PAYLOAD, SECRET, now)}")
case("v0 beside a valid v1", PAYLOAD, SECRET, f"t={now},v0=deadbeef,v1={v1(PAYLOAD, SECRET, now)}")
case("no timestamp", PAYLOAD, SECRET, f"v1={v1(PAYLOAD, SECRET, now)}")
case("unicode body", UNICODE_PAYLOAD, SECRET, header(UNICODE_PAYLOAD, SECRET, now))
case("empty body", "", SECRET, header("", SECRET, now))

print(json.dumps(cases))
