"""Validate rendered Kubernetes manifests, strictly and offline.

Usage: validate_k8s.py CRD_YAML FILE...

* Every built-in kind against the Kubernetes schemas of each version from
  1.33 to 1.37 (`kubernetes-validate --strict`: an unknown key is an error).
* `InferencePool` against the openAPIV3Schema of the CRD given (vendored at a
  pinned release of the Gateway API Inference Extension), made strict the way
  `kubectl apply --validate=strict` treats a CRD: an object schema with
  `properties` accepts no other key.

Prints one line per object and version; exits 1 on the first failure, naming
the file, the object and the reason.
"""
import copy
import sys

import jsonschema
import kubernetes_validate
import yaml

VERSIONS = ["1.33.0", "1.34.0", "1.35.0", "1.36.0", "1.37.0"]


def strict(schema):
    s = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node:
                node["additionalProperties"] = False
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(s)
    # metadata is ObjectMeta, checked by the API server, not by the CRD.
    s["properties"]["metadata"] = {"type": "object"}
    return s


def main():
    crd_path, files = sys.argv[1], sys.argv[2:]
    with open(crd_path) as f:
        crd = yaml.safe_load(f)
    schemas = {
        (crd["spec"]["group"] + "/" + v["name"], crd["spec"]["names"]["kind"]): strict(v["schema"]["openAPIV3Schema"])
        for v in crd["spec"]["versions"]
    }
    count = 0
    for path in files:
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d is not None]
        if not docs:
            print(f"{path}: no objects", file=sys.stderr)
            return 1
        for d in docs:
            name = f"{d.get('kind')}/{d.get('metadata', {}).get('name')}"
            key = (d.get("apiVersion"), d.get("kind"))
            if key in schemas:
                try:
                    jsonschema.validate(d, schemas[key])
                except jsonschema.ValidationError as e:
                    print(f"{path}: {name}: {e.message} at {list(e.absolute_path)}", file=sys.stderr)
                    return 1
                print(f"ok {name} (CRD {key[0]})")
                count += 1
                continue
            for v in VERSIONS:
                try:
                    kubernetes_validate.validate(d, v, strict=True)
                except kubernetes_validate.ValidationError as e:
                    print(f"{path}: {name}: Kubernetes {v}: {e.message} at {list(e.path)}", file=sys.stderr)
                    return 1
                except kubernetes_validate.SchemaNotFoundError as e:
                    print(f"{path}: {name}: Kubernetes {v}: no schema ({e})", file=sys.stderr)
                    return 1
            print(f"ok {name} (Kubernetes {VERSIONS[0]} to {VERSIONS[-1]}, strict)")
            count += 1
    print(f"{count} object(s) valid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
