"""An independent verifier of llama-orch's signed engine provenance.

Written from the published formats, not from llama-orch's code: a Sigstore
bundle (v0.3, key-based: `verificationMaterial.publicKey`), its DSSE envelope
(the pre-authentication encoding of DSSE v1), an in-toto Statement v1 with a
SLSA provenance v1 predicate; the signature checked with Python's
`cryptography` (OpenSSL) against an Ed25519 public key in PEM.

usage: verify_bundle.py BUNDLE.json PUBLIC_KEY.pem ARCHIVE_SHA256
Exit 0 and print the statement's subject when the signature holds and the
archive digest is a subject; exit 1 with the reason otherwise.
"""

import base64
import hashlib
import json
import sys

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey


def pae(payload_type: bytes, payload: bytes) -> bytes:
    return b"DSSEv1 %d %s %d %s" % (len(payload_type), payload_type, len(payload), payload)


def main() -> int:
    bundle_path, key_path, archive_sha = sys.argv[1:4]
    with open(bundle_path, "rb") as f:
        bundle = json.load(f)
    with open(key_path, "rb") as f:
        key = serialization.load_pem_public_key(f.read())
    if not isinstance(key, Ed25519PublicKey):
        print("not an Ed25519 public key")
        return 1
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    key_id = hashlib.sha256(der).hexdigest()
    if bundle.get("mediaType") != "application/vnd.dev.sigstore.bundle.v0.3+json":
        print("not a Sigstore bundle v0.3")
        return 1
    hint = bundle["verificationMaterial"]["publicKey"]["hint"]
    env = bundle["dsseEnvelope"]
    if env["payloadType"] != "application/vnd.in-toto+json":
        print("not an in-toto payload")
        return 1
    payload = base64.b64decode(env["payload"])
    ok = False
    for sig in env["signatures"]:
        if sig.get("keyid", hint) != key_id:
            continue
        try:
            key.verify(base64.b64decode(sig["sig"]), pae(env["payloadType"].encode(), payload))
            ok = True
        except InvalidSignature:
            print("the signature does not verify")
            return 1
    if not ok:
        print(f"no signature by key {key_id}")
        return 1
    statement = json.loads(payload)
    if statement["_type"] != "https://in-toto.io/Statement/v1":
        print("not an in-toto Statement v1")
        return 1
    if statement["predicateType"] != "https://slsa.dev/provenance/v1":
        print("not a SLSA provenance v1 predicate")
        return 1
    digests = {s["name"]: s["digest"]["sha256"] for s in statement["subject"]}
    if archive_sha not in digests.values():
        print(f"the archive {archive_sha} is not a subject: {digests}")
        return 1
    builder = statement["predicate"]["runDetails"]["builder"]["id"]
    print(json.dumps({"key_id": key_id, "subject": digests, "builder": builder}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
