"""Checks Kubernetes manifests for meshtrain (deploy/kubernetes/*.yaml) without a cluster:

- an MPIJob against the MPI Operator's kubeflow.org/v2beta1 schema (schema/, vendored with its
  source), with jsonschema;
- every pod template, PersistentVolumeClaim and ConfigMap field by field against the Kubernetes
  API models of Debian's python3-kubernetes (generated from the Kubernetes OpenAPI): unknown
  fields, wrong types and missing required fields are errors;
- what meshtrain needs: a Launcher (1 replica) and Workers, one rank per GPU (each worker's
  nvidia.com/gpu limit equals slotsPerWorker), every volumeMount backed by a volume, and one
  shared volume for checkpoints mounted on the launcher and every worker.

  /usr/bin/python3 deploy/kubernetes/validate.py FILE.yaml...     exit 0 valid, 1 invalid
"""
import json
import os
import re
import sys

import jsonschema
import yaml
from kubernetes import client

SCHEMA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "schema", "mpijob-v2beta1.schema.json")


class Invalid(Exception):
    pass


def check_model(value, type_name, path):
    """value (parsed YAML) against a kubernetes.client type name such as 'V1PodSpec',
    'list[V1Container]', 'dict(str, str)', 'str', 'int', 'bool', 'object'."""
    if value is None:
        return
    m = re.fullmatch(r"list\[(.+)\]", type_name)
    if m:
        if not isinstance(value, list):
            raise Invalid(f"{path}: expected a list, got {type(value).__name__}")
        for i, v in enumerate(value):
            check_model(v, m.group(1), f"{path}[{i}]")
        return
    m = re.fullmatch(r"dict\(str, (.+)\)", type_name)
    if m:
        if not isinstance(value, dict):
            raise Invalid(f"{path}: expected a mapping, got {type(value).__name__}")
        for k, v in value.items():
            check_model(v, m.group(1), f"{path}.{k}")
        return
    simple = {"str": str, "bool": bool, "float": (int, float), "datetime": str, "date": str}
    if type_name in simple:
        if not isinstance(value, simple[type_name]) or (type_name == "float" and isinstance(value, bool)):
            raise Invalid(f"{path}: expected {type_name}, got {type(value).__name__} {value!r}")
        return
    if type_name == "int":
        if not isinstance(value, int) or isinstance(value, bool):
            raise Invalid(f"{path}: expected an integer, got {type(value).__name__} {value!r}")
        return
    if type_name == "object":  # IntOrString, Quantity, free-form
        return
    cls = getattr(client.models, type_name, None)
    if cls is None:
        raise Invalid(f"{path}: unknown model type {type_name}")
    if not isinstance(value, dict):
        raise Invalid(f"{path}: expected a {type_name} mapping, got {type(value).__name__}")
    fields = {json_name: attr for attr, json_name in cls.attribute_map.items()}
    for k, v in value.items():
        if k not in fields:
            raise Invalid(f"{path}: unknown field '{k}' for {type_name} (known: {', '.join(sorted(fields))})")
        check_model(v, cls.openapi_types[fields[k]], f"{path}.{k}")
    # Required fields: the generated constructors reject a missing one.
    try:
        client.ApiClient()._ApiClient__deserialize(value, type_name)
    except ValueError as e:
        raise Invalid(f"{path}: {e}") from None


def quantity(v):
    return str(v)


def check_mpijob(doc, where):
    schema = json.load(open(SCHEMA))
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.path))
    if errors:
        e = errors[0]
        raise Invalid(f"{where}: {'.'.join(str(p) for p in e.path) or '(top)'}: {e.message}")
    check_model(doc["metadata"], "V1ObjectMeta", f"{where}: metadata")
    spec = doc["spec"]
    replicas = spec["mpiReplicaSpecs"]
    for role in replicas:
        if role not in ("Launcher", "Worker"):
            raise Invalid(f"{where}: spec.mpiReplicaSpecs.{role}: expected Launcher or Worker")
    for role in ("Launcher", "Worker"):
        if role not in replicas:
            raise Invalid(f"{where}: spec.mpiReplicaSpecs has no {role}")
        r = replicas[role]
        if "template" not in r:
            raise Invalid(f"{where}: spec.mpiReplicaSpecs.{role}: no template")
        check_model(r["template"], "V1PodTemplateSpec", f"{where}: spec.mpiReplicaSpecs.{role}.template")
    if replicas["Launcher"].get("replicas", 1) != 1:
        raise Invalid(f"{where}: spec.mpiReplicaSpecs.Launcher.replicas must be 1")
    if replicas["Worker"].get("replicas", 1) < 1:
        raise Invalid(f"{where}: spec.mpiReplicaSpecs.Worker.replicas must be at least 1")
    slots = spec.get("slotsPerWorker", 1)
    mounts_by_role = {}
    for role in ("Launcher", "Worker"):
        pod = replicas[role]["template"].get("spec", {})
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        mounts_by_role[role] = {}
        for c in pod["containers"]:
            p = f"{where}: spec.mpiReplicaSpecs.{role}.template.spec.containers[{c['name']}]"
            for m in c.get("volumeMounts", []):
                if m["name"] not in volumes:
                    raise Invalid(f"{p}: volumeMount '{m['name']}' has no volume of that name")
                v = volumes[m["name"]]
                if "persistentVolumeClaim" in v and not m.get("readOnly"):
                    mounts_by_role[role][m["mountPath"]] = v["persistentVolumeClaim"]["claimName"]
            if role == "Worker":
                limits = c.get("resources", {}).get("limits", {})
                gpus = limits.get("nvidia.com/gpu")
                if gpus is None or quantity(gpus) != str(slots):
                    raise Invalid(f"{p}: resources.limits nvidia.com/gpu is {gpus}, expected slotsPerWorker = "
                                  f"{slots} (one rank per GPU)")
    shared = set(mounts_by_role["Launcher"].items()) & set(mounts_by_role["Worker"].items())
    if not shared:
        raise Invalid(f"{where}: no writable PersistentVolumeClaim is mounted at the same path on the launcher "
                      f"and the workers (the shared checkpoint volume)")
    return f"MPIJob {doc['metadata'].get('name')}: {replicas['Worker'].get('replicas', 1)} workers x {slots} GPUs, " \
           f"shared volume {sorted(shared)}"


KINDS = {("v1", "PersistentVolumeClaim"): "V1PersistentVolumeClaim", ("v1", "ConfigMap"): "V1ConfigMap"}


def validate(path):
    out = []
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    if not docs:
        raise Invalid(f"{path}: no documents")
    for i, doc in enumerate(docs):
        where = f"{path} document {i + 1}"
        if not isinstance(doc, dict):
            raise Invalid(f"{where}: not a mapping")
        key = (doc.get("apiVersion"), doc.get("kind"))
        if key == ("kubeflow.org/v2beta1", "MPIJob"):
            out.append(check_mpijob(doc, where))
        elif key in KINDS:
            body = {k: v for k, v in doc.items() if k not in ("apiVersion", "kind")}
            check_model(body, KINDS[key], f"{where} ({key[1]})")
            out.append(f"{key[1]} {doc.get('metadata', {}).get('name')}")
        else:
            raise Invalid(f"{where}: apiVersion/kind {key} is not one this checker knows "
                          f"(MPIJob kubeflow.org/v2beta1, v1 PersistentVolumeClaim, v1 ConfigMap)")
    return out


def main():
    if len(sys.argv) < 2:
        sys.exit("usage: validate.py FILE.yaml...")
    bad = 0
    for path in sys.argv[1:]:
        try:
            for line in validate(path):
                print(f"ok: {path}: {line}")
        except (Invalid, yaml.YAMLError, OSError) as e:
            print(f"invalid: {e}", file=sys.stderr)
            bad += 1
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
