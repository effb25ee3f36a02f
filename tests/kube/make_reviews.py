import json, copy
def review(uid, obj, ns, kind=None, resource=None, op="CREATE", name=""):
    kind = kind or {"group": "", "version": "v1", "kind": "Pod"}
    resource = resource or {"group": "", "version": "v1", "resource": "pods"}
    return {"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1", "request": {
        "uid": uid, "kind": kind, "resource": resource, "requestKind": kind, "requestResource": resource,
        "name": name, "namespace": ns, "operation": op,
        "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller",
                     "uid": "5b7a6a8e-2f1e-4f51-9a43-0d1b8f0f5a11", "groups": ["system:serviceaccounts", "system:serviceaccounts:kube-system", "system:authenticated"]},
        "object": obj, "oldObject": None, "dryRun": False,
        "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"}}}

def api_access(n):
    return {"name": f"kube-api-access-{n}", "projected": {"sources": [
        {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
        {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
        {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}}],
        "defaultMode": 420}}

def container(name, image, command=None, args=None, n="x7k2p", port=None):
    c = {"name": name, "image": image}
    if command is not None: c["command"] = command
    if args is not None: c["args"] = args
    if port: c["ports"] = [{"name": "http", "containerPort": port, "protocol": "TCP"}]
    c.update({"env": [{"name": "MODEL_UPSTREAM", "value": "http://127.0.0.1:15001"}],
              "resources": {"limits": {"cpu": "2", "memory": "1Gi"}, "requests": {"cpu": "500m", "memory": "512Mi"}},
              "volumeMounts": [{"name": f"kube-api-access-{n}", "readOnly": True, "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}],
              "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File", "imagePullPolicy": "IfNotPresent"})
    return c

def pod_spec(containers, sa, n, restart="Always"):
    return {"volumes": [api_access(n)], "containers": containers, "restartPolicy": restart,
            "terminationGracePeriodSeconds": 30, "dnsPolicy": "ClusterFirst", "serviceAccountName": sa, "serviceAccount": sa,
            "securityContext": {}, "schedulerName": "default-scheduler",
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
                            {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}],
            "priority": 0, "enableServiceLinks": True, "preemptionPolicy": "PreemptLowerPriority"}

def deployment_pod(annotations=None, command=["python", "-m", "flood_model"], args=["--serve", "--port=8080"]):
    meta = {"generateName": "flood-model-7d9f8b6c5-", "namespace": "plugins", "creationTimestamp": None,
            "labels": {"app.kubernetes.io/name": "flood-model", "pod-template-hash": "7d9f8b6c5"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "flood-model-7d9f8b6c5",
                                 "uid": "0f3c1a52-8d1e-4f2b-bb0e-3b6f4c1d2e9a", "controller": True, "blockOwnerDeletion": True}]}
    if annotations: meta["annotations"] = annotations
    c = container("flood-model", "registry.example/plugins/flood-model:1.4.2", command, args, "x7k2p", 8080)
    return {"kind": "Pod", "apiVersion": "v1", "metadata": meta, "spec": pod_spec([c], "flood-model", "x7k2p"), "status": {}}

def job_pod():
    uid = "9a1e5c7b-4d2f-4e8a-8b3c-6f1d2a7e9c40"
    meta = {"generateName": "risk-batch-", "namespace": "plugins", "creationTimestamp": None,
            "labels": {"batch.kubernetes.io/controller-uid": uid, "batch.kubernetes.io/job-name": "risk-batch", "controller-uid": uid, "job-name": "risk-batch"},
            "annotations": {"batch.kubernetes.io/job-tracking": ""},
            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": "risk-batch", "uid": uid, "controller": True, "blockOwnerDeletion": True}],
            "finalizers": ["batch.kubernetes.io/job-tracking"]}
    c = container("risk-model", "registry.example/plugins/risk-model:2.0.0", ["/app/risk-model"], ["--clause", "c-flood-17"], "m4q9z")
    return {"kind": "Pod", "apiVersion": "v1", "metadata": meta, "spec": pod_spec([c], "risk-model", "m4q9z", "Never"), "status": {}}

def cronjob_pod():
    uid = "3c8e2f1a-7b6d-4c5e-9f0a-1b2c3d4e5f60"
    meta = {"generateName": "nightly-validate-29318400-", "namespace": "plugins", "creationTimestamp": None,
            "labels": {"batch.kubernetes.io/controller-uid": uid, "batch.kubernetes.io/job-name": "nightly-validate-29318400", "controller-uid": uid, "job-name": "nightly-validate-29318400"},
            "annotations": {"batch.kubernetes.io/cronjob-scheduled-timestamp": "2026-01-01T00:00:00Z", "batch.kubernetes.io/job-tracking": "", "nexus.io/sandbox": "default"},
            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": "nightly-validate-29318400", "uid": uid, "controller": True, "blockOwnerDeletion": True}],
            "finalizers": ["batch.kubernetes.io/job-tracking"]}
    c = container("validator", "registry.example/plugins/validator:0.9.1", ["/usr/local/bin/validate"], ["--all-clauses"], "b8w3r")
    return {"kind": "Pod", "apiVersion": "v1", "metadata": meta, "spec": pod_spec([c], "validator", "b8w3r", "OnFailure"), "status": {}}

out = {
 "deployment-pod": review("7f0d2c1e-1b3a-4e6f-9c2d-0a1b2c3d4e01", deployment_pod(), "plugins"),
 "job-pod": review("7f0d2c1e-1b3a-4e6f-9c2d-0a1b2c3d4e02", job_pod(), "plugins"),
 "cronjob-pod-sandbox": review("7f0d2c1e-1b3a-4e6f-9c2d-0a1b2c3d4e03", cronjob_pod(), "plugins"),
 "deployment-pod-sandbox": review("7f0d2c1e-1b3a-4e6f-9c2d-0a1b2c3d4e04", deployment_pod({"nexus.io/sandbox": "default"}), "plugins"),
 "deployment-pod-sandbox-no-command": review("7f0d2c1e-1b3a-4e6f-9c2d-0a1b2c3d4e05", deployment_pod({"nexus.io/sandbox": "default"}, None, ["--serve"]), "plugins"),
 "deployment-pod-opt-out": review("7f0d2c1e-1b3a-4e6f-9c2d-0a1b2c3d4e06", deployment_pod({"nexus.io/inject": "disabled"}), "plugins"),
}
dep = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "flood-model", "namespace": "plugins"},
       "spec": {"replicas": 1, "selector": {"matchLabels": {"app.kubernetes.io/name": "flood-model"}},
                "template": {"metadata": {"labels": {"app.kubernetes.io/name": "flood-model"}}, "spec": {"containers": [{"name": "flood-model", "image": "registry.example/plugins/flood-model:1.4.2"}]}}}}
out["wrong-kind-deployment"] = review("7f0d2c1e-1b3a-4e6f-9c2d-0a1b2c3d4e07", dep, "plugins",
    {"group": "apps", "version": "v1", "kind": "Deployment"}, {"group": "apps", "version": "v1", "resource": "deployments"}, name="flood-model")
for name, doc in out.items():
    with open(f"reviews/{name}.json", "w") as f:
        json.dump(doc, f, indent=2); f.write("\n")
# malformed: a review cut in the middle
s = json.dumps(out["deployment-pod"], indent=2)
with open("reviews/malformed.json", "w") as f:
    f.write(s[:len(s)//2])
