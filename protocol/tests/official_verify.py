#!/usr/bin/env python3
"""Verifies webhook signatures made by the protocol crate with the official receiver library.

Run by protocol/tests/signing_vectors.rs. Reads JSON lines from stdin, each
{"secret", "msg_id", "timestamp", "body", "signature"}, and checks every line with the
official `standardwebhooks` package's `Webhook(secret).verify(body, headers)`, the same call a
Python receiver makes. That catches a mismatch with real receivers that our own verify, which
shares the signing code, would never notice.

Exit status: 0 when every line verifies, 1 on any failure or on empty input (a run that checks
nothing must not pass), 2 when the package is missing. Secrets are never printed.
"""

import json
import sys

try:
    from importlib.metadata import version

    from standardwebhooks import Webhook
except ImportError as error:
    print(
        f"official_verify.py: cannot import standardwebhooks ({error}); "
        "run `pip install standardwebhooks` for the python3 on PATH",
        file=sys.stderr,
    )
    sys.exit(2)


def main() -> int:
    n_verified = 0
    n_failed = 0
    for line_number, line in enumerate(sys.stdin, start=1):
        if not line.strip():
            continue
        case = None
        try:
            case = json.loads(line)
            headers = {
                "webhook-id": case["msg_id"],
                "webhook-timestamp": str(case["timestamp"]),
                "webhook-signature": case["signature"],
            }
            # json_parse=False: bodies in these tests need not be JSON; the signature check is
            # the same either way.
            Webhook(case["secret"]).verify(case["body"], headers, json_parse=False)
            n_verified += 1
        except Exception as error:  # noqa: BLE001 - every failure must be reported, not raised
            n_failed += 1
            msg_id = case.get("msg_id") if isinstance(case, dict) else None
            print(
                f"official_verify.py: line {line_number} (msg_id {msg_id!r}) failed: "
                f"{type(error).__name__}: {error}",
                file=sys.stderr,
            )
    if n_verified == 0 and n_failed == 0:
        print("official_verify.py: no input lines, nothing was verified", file=sys.stderr)
        return 1
    package = f"standardwebhooks {version('standardwebhooks')}"
    if n_failed:
        print(f"official_verify.py: {n_failed} of {n_verified + n_failed} failed with {package}", file=sys.stderr)
        return 1
    print(f"official_verify.py: verified {n_verified} signatures with {package}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
