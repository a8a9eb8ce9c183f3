"""deploy/kubernetes/mpijob.yaml is valid (MPIJob v2beta1 schema, Kubernetes models, meshtrain's
own rules), and the checker rejects each kind of mistake with a message naming the field.
  /usr/bin/python3 tests/deploy/test_kubernetes.py
"""
import copy
import os
import subprocess
import sys
import tempfile

try:
    import jsonschema  # noqa: F401  (validate.py needs these three)
    import kubernetes  # noqa: F401
    import yaml
except ImportError as e:
    # Skipped (77) where they are missing, unless CI requires the deploy checks.
    if os.environ.get("MESHTRAIN_REQUIRE_DEPLOY") == "1":
        sys.exit(f"FAIL: {e}: apt-get install python3-jsonschema python3-yaml python3-kubernetes")
    print(f"SKIP: {e}: apt-get install python3-jsonschema python3-yaml python3-kubernetes")
    sys.exit(77)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHECK = os.path.join(ROOT, "deploy", "kubernetes", "validate.py")
MANIFEST = os.path.join(ROOT, "deploy", "kubernetes", "mpijob.yaml")


def run(path):
    return subprocess.run([sys.executable, CHECK, path], capture_output=True, text=True, timeout=60)


def main():
    p = run(MANIFEST)
    if p.returncode != 0 or p.stdout.count("ok:") != 3:
        sys.exit(f"FAIL: {MANIFEST} should be valid:\n{p.stdout}{p.stderr}")
    docs = list(yaml.safe_load_all(open(MANIFEST)))
    job_i = next(i for i, d in enumerate(docs) if d["kind"] == "MPIJob")

    def worker(d):
        return d["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]

    def launcher(d):
        return d["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]

    mistakes = [
        ("misspelt MPIJob field", lambda d: d["spec"].update(slotPerWorker=8), "slotPerWorker"),
        ("v1 API version", lambda d: d.update(apiVersion="kubeflow.org/v1"), "kubeflow.org/v2beta1"),
        ("replicas as text", lambda d: d["spec"]["mpiReplicaSpecs"]["Worker"].update(replicas="two"),
         "'two' is not of type 'integer'"),
        ("unknown MPI implementation", lambda d: d["spec"].update(mpiImplementation="MPICH"), "MPICH"),
        ("misspelt container field", lambda d: worker(d)["containers"][0].update(imagee="x"),
         "unknown field 'imagee'"),
        ("container without a name", lambda d: worker(d)["containers"][0].pop("name"), "name"),
        ("ports as a mapping", lambda d: worker(d)["containers"][0].update(ports={"a": 1}),
         "expected a list"),
        ("no Worker", lambda d: d["spec"]["mpiReplicaSpecs"].pop("Worker"), "no Worker"),
        ("two launchers", lambda d: d["spec"]["mpiReplicaSpecs"]["Launcher"].update(replicas=2),
         "Launcher.replicas must be 1"),
        ("GPUs != slots", lambda d: d["spec"].update(slotsPerWorker=4), "expected slotsPerWorker = 4"),
        ("mount without volume", lambda d: worker(d)["volumes"].pop(0), "has no volume"),
        ("no shared checkpoint volume", lambda d: launcher(d)["containers"][0]["volumeMounts"].pop(0),
         "shared checkpoint volume"),
        ("unknown kind", None, "not one this checker knows"),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for what, change, expect in mistakes:
            ds = copy.deepcopy(docs)
            if change is None:
                ds.append({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"}})
            else:
                change(ds[job_i])
            path = os.path.join(tmp, "m.yaml")
            with open(path, "w") as f:
                yaml.safe_dump_all(ds, f)
            p = run(path)
            if p.returncode != 1 or expect not in p.stderr:
                sys.exit(f"FAIL: {what}: expected exit 1 naming '{expect}', got {p.returncode}:\n{p.stdout}{p.stderr}")
    print(f"ok: manifest valid; {len(mistakes)} kinds of mistake rejected")


if __name__ == "__main__":
    main()
