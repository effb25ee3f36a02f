package nexus.authz_test

import rego.v1

import data.nexus.authz

flood := "spiffe://nexus.local/ns/plugins/sa/flood-model"

hazard := "spiffe://nexus.local/ns/data/sa/hazard-api"

ex := {"id": "ex-1", "plugin": flood, "clause": "c-flood-17", "not_after": "2026-11-26T10:00:00Z", "not_after_ns": 1795687200000000000}

# `with` replaces base documents key by key (data.nexus itself also holds the policy's
# rules, which `with` must not replace, in OPA as here).
bindings := {flood: ["c-flood-17", "c-flood-18"]}

executions := {"ex-1": ex}

req(method, path, clause, execution) := {
	"direction": "inbound",
	"source": {"spiffe_id": flood},
	"destination": {"spiffe_id": hazard},
	"request": {"method": method, "path": path, "segments": [], "query": {}, "headers": {}, "body_size": 0},
	"clause": clause,
	"execution": execution,
	"time": "2026-11-26T09:41:07.123Z",
	"time_ns": 1795686067123000000,
}

test_bound_with_open_execution_is_allowed if {
	d := authz.decision with input as req("GET", "/clauses/c-flood-17/rainfall", "c-flood-17", ex)
		with data.nexus.bindings as bindings
		with data.nexus.executions as executions
		with data.nexus.revoked as {}
		with data.nexus.public_paths as ["/healthz"]
	d.allow == true
	d.reasons == ["spiffe://nexus.local/ns/plugins/sa/flood-model may read clause c-flood-17 under execution ex-1"]
}

test_unbound_clause_is_denied if {
	d := authz.decision with input as req("GET", "/clauses/c-quake-3/x", "c-quake-3", null)
		with data.nexus.bindings as bindings
		with data.nexus.executions as executions
		with data.nexus.revoked as {}
		with data.nexus.public_paths as ["/healthz"]
	d.allow == false
	"spiffe://nexus.local/ns/plugins/sa/flood-model is not bound to clause c-quake-3" in d.reasons
}

test_bound_without_execution_is_denied if {
	d := authz.decision with input as req("GET", "/clauses/c-flood-18/x", "c-flood-18", null)
		with data.nexus.bindings as bindings
		with data.nexus.executions as executions
		with data.nexus.revoked as {}
		with data.nexus.public_paths as ["/healthz"]
	d.allow == false
	d.reasons == ["no open execution of clause c-flood-18 for spiffe://nexus.local/ns/plugins/sa/flood-model"]
}

test_execution_for_another_clause_is_denied if {
	d := authz.decision with input as req("GET", "/clauses/c-flood-18/x", "c-flood-18", ex)
		with data.nexus.bindings as bindings
		with data.nexus.executions as executions
		with data.nexus.revoked as {}
		with data.nexus.public_paths as ["/healthz"]
	d.allow == false
}

test_expired_execution_is_denied if {
	late := object.union(req("GET", "/clauses/c-flood-17/x", "c-flood-17", ex), {"time": "2026-11-26T10:00:01Z", "time_ns": 1795687201000000000})
	d := authz.decision with input as late
		with data.nexus.bindings as bindings
		with data.nexus.executions as executions
		with data.nexus.revoked as {}
		with data.nexus.public_paths as ["/healthz"]
	d.allow == false
}

test_execution_not_opened_by_gateway_is_denied if {
	forged := {"id": "ex-forged", "plugin": flood, "clause": "c-flood-17", "not_after": "2099-01-01T00:00:00Z", "not_after_ns": 4070908800000000000}
	d := authz.decision with input as req("GET", "/clauses/c-flood-17/x", "c-flood-17", forged)
		with data.nexus.bindings as bindings
		with data.nexus.executions as executions
		with data.nexus.revoked as {}
		with data.nexus.public_paths as ["/healthz"]
	d.allow == false
}

test_write_method_is_denied if {
	d := authz.decision with input as req("DELETE", "/clauses/c-flood-17/x", "c-flood-17", ex)
		with data.nexus.bindings as bindings
		with data.nexus.executions as executions
		with data.nexus.revoked as {}
		with data.nexus.public_paths as ["/healthz"]
	d.allow == false
	"method DELETE is not allowed on clause data" in d.reasons
}

test_revoked_source_is_denied if {
	d := authz.decision with input as req("GET", "/clauses/c-flood-17/x", "c-flood-17", ex)
		with data.nexus.bindings as bindings
		with data.nexus.executions as executions
		with data.nexus.revoked as {flood: {"reason": "exfiltration"}}
	d.allow == false
	d.reasons == ["workload spiffe://nexus.local/ns/plugins/sa/flood-model is revoked"]
}

test_revoked_destination_is_denied if {
	d := authz.decision with input as req("GET", "/clauses/c-flood-17/x", "c-flood-17", ex)
		with data.nexus.bindings as bindings
		with data.nexus.executions as executions
		with data.nexus.revoked as {hazard: {"reason": "compromised"}}
	d.allow == false
}

test_public_path_is_allowed if {
	d := authz.decision with input as req("GET", "/healthz", null, null)
		with data.nexus.bindings as bindings
		with data.nexus.executions as executions
		with data.nexus.revoked as {}
		with data.nexus.public_paths as ["/healthz"]
	d.allow == true
}

test_unknown_path_is_denied if {
	d := authz.decision with input as req("GET", "/admin", null, null)
		with data.nexus.bindings as bindings
		with data.nexus.executions as executions
		with data.nexus.revoked as {}
		with data.nexus.public_paths as ["/healthz"]
	d.allow == false
	d.reasons == ["no rule allows this request"]
}

test_mixed_case_path_has_no_clause_and_is_denied if {
	d := authz.decision with input as req("GET", "/CLAUSES/c-flood-17/x", null, null)
		with data.nexus.bindings as bindings
		with data.nexus.executions as executions
		with data.nexus.revoked as {}
		with data.nexus.public_paths as ["/healthz"]
	d.allow == false
}

test_revoked_public_path_is_denied if {
	d := authz.decision with input as req("GET", "/healthz", null, null)
		with data.nexus.bindings as bindings
		with data.nexus.revoked as {flood: {}}
		with data.nexus.public_paths as ["/healthz"]
	d.allow == false
}

# The binding object shape ({clauses, budgets}): bound by its `clauses`, never by a
# budget's field names or values.
object_bindings := {flood: {"clauses": ["c-flood-17"], "budgets": {"requests_per_s": 100, "egress_bytes": 1024, "distinct_clauses": 4, "window": "10s"}}}

test_binding_object_binds_its_clauses if {
	d := authz.decision with input as req("GET", "/clauses/c-flood-17/rainfall", "c-flood-17", ex)
		with data.nexus.bindings as object_bindings
		with data.nexus.executions as executions
		with data.nexus.revoked as {}
		with data.nexus.public_paths as ["/healthz"]
	d.allow == true
}

budget_name_allowed(clause) if {
	ex2 := object.union(ex, {"clause": clause})
	d := authz.decision with input as req("GET", concat("/", ["/clauses", clause, "x"]), clause, ex2)
		with data.nexus.bindings as object_bindings
		with data.nexus.executions as {"ex-1": ex2}
		with data.nexus.revoked as {}
		with data.nexus.public_paths as ["/healthz"]
	d.allow == true
}

test_binding_object_does_not_bind_its_budget_names if {
	every clause in ["budgets", "clauses", "requests_per_s", "window", "10s"] {
		not budget_name_allowed(clause)
	}
}

test_binding_object_does_not_bind_other_clauses if {
	d := authz.decision with input as req("GET", "/clauses/c-flood-18/rainfall", "c-flood-18", ex)
		with data.nexus.bindings as object_bindings
		with data.nexus.executions as executions
		with data.nexus.revoked as {}
		with data.nexus.public_paths as ["/healthz"]
	d.allow == false
}
