"""Reads Kino-signed files with c2pa-python (the C2PA C library's Python bindings, from PyPI):
argv = pairs of (FILE, EXPECTED) where EXPECTED is `valid` or `invalid`. Prints one JSON line
per file; exits non-zero on the first mismatch."""
import json
import sys

import c2pa

TRAINED = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"


def read(path):
    with open(path, "rb") as f:
        with c2pa.Reader("video/mp4", f) as r:
            state = r.get_validation_state()
            manifest = r.get_active_manifest() or {}
            results = r.get_validation_results() or {}
    actions = []
    for a in manifest.get("assertions", []):
        if a.get("label", "").startswith("c2pa.actions"):
            actions += a.get("data", {}).get("actions", [])
    failures = [f.get("code") for f in (results.get("activeManifest") or {}).get("failure", [])]
    return state, actions, failures


def main():
    args = sys.argv[1:]
    for path, want in zip(args[::2], args[1::2]):
        try:
            state, actions, failures = read(path)
        except c2pa.C2paError as e:
            state, actions, failures = "error", [], [str(e)]
        print(json.dumps({"file": path, "state": state, "actions": actions, "failures": failures}))
        if want == "valid":
            # Kino's own root is not on the C2PA trust list: "Valid" (untrusted signer).
            assert state in ("Valid", "Trusted"), (path, state, failures)
            created = [a for a in actions if a.get("action") == "c2pa.created"]
            assert created, actions
            assert created[0].get("digitalSourceType") == TRAINED, created
            agent = created[0].get("softwareAgent")
            name = agent.get("name") if isinstance(agent, dict) else agent
            assert name and name.startswith("Kino"), agent
        else:
            assert state == "Invalid", (path, state, failures)
            assert any("mismatch" in (f or "") for f in failures), failures
    print("OK")


main()
