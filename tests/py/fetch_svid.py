#!/usr/bin/env python3
"""Fetch the X.509-SVID and bundles from a SPIFFE Workload API with py-spiffe.

Usage: fetch_svid.py SOCKET_PATH

Prints one JSON object: spiffe_id, not_after (ISO 8601, UTC), serial (hex), leaf_pem,
bundle_trust_domains (sorted: the SVID's own plus federated ones, from FetchX509SVID),
x509_bundles_trust_domains (sorted, from FetchX509Bundles). Exits non-zero with the
error on stderr if the Workload API cannot be read.
"""

import json
import sys

from cryptography.hazmat.primitives.serialization import Encoding
from spiffe import WorkloadApiClient


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    client = WorkloadApiClient(f"unix:{sys.argv[1]}")
    try:
        context = client.fetch_x509_context(timeout=10)
        bundles = client.fetch_x509_bundles(timeout=10)
    finally:
        client.close()
    svid = context.default_svid
    leaf = svid.leaf
    print(
        json.dumps(
            {
                "spiffe_id": str(svid.spiffe_id),
                "not_after": leaf.not_valid_after_utc.isoformat(),
                "serial": format(leaf.serial_number, "x"),
                "leaf_pem": leaf.public_bytes(Encoding.PEM).decode(),
                "bundle_trust_domains": sorted(
                    str(b.trust_domain) for b in context.x509_bundle_set.bundles
                ),
                "x509_bundles_trust_domains": sorted(
                    str(b.trust_domain) for b in bundles.bundles
                ),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
