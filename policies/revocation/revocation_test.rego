package nexus.revocation_test

import rego.v1

import data.nexus.revocation

flood := "spiffe://nexus.local/ns/plugins/sa/flood-model"

hazard := "spiffe://nexus.local/ns/data/sa/hazard-api"

rates := "spiffe://nexus.local/ns/data/sa/rates-api"

gateway := "spiffe://nexus.local/ns/nexus/sa/gateway"

now := 1764150000123

# The thresholds of data.yaml. The tests bring them (`with`, key by key: data.nexus.revocation
# also holds this package's rules), so they pass whichever folder is the root.
kinds := {
	"rate_spike": {"observers": ["peer", "self"], "alert_score": 4, "revoke_score": 8, "corroborates": true},
	"denial_burst": {"observers": ["peer", "self"], "alert_score": 1, "corroborates": true},
	"egress_bytes": {"observers": ["peer", "self"], "alert_score": 1, "revoke_score": 3, "corroborates": true},
	"unbound_clause": {"observers": ["peer", "self"], "alert_score": 1, "revoke_score": 1, "corroborates": true},
	"auth_failures": {"observers": ["peer"], "alert_score": 1, "corroborates": false},
	"sandbox_violation": {"observers": ["self"], "alert_score": 1, "revoke_actions": ["kill"], "corroborates": true},
	"budget_exceeded": {"observers": ["peer", "self"], "alert_score": 1, "revoke_score": 2, "corroborates": false},
}

corroboration := {"distinct_kinds": 2, "distinct_reporters": 2}

# A signal as the gateway hands it to the policy: a self-observation by the workload's
# own sidecar needs no evidence, a peer observation comes verified (its cited records
# were found and matched) unless a test says otherwise with `unverified`.
sig(kind, workload, reporter, observed_as, score, age_ms) := {
	"id": "sig-1",
	"kind": kind,
	"workload": workload,
	"reporter": reporter,
	"observed_as": observed_as,
	"score": score,
	"evidence": {"count": 40, "window_ms": 250},
	"decision_ids": ["d1", "d2"],
	"verification": verification_of(workload, reporter, observed_as),
	"time_ms": now - age_ms,
}

verification_of(workload, reporter, observed_as) := {"status": "not_required", "reason": "observed by the workload's own sidecar"} if {
	observed_as == "self"
	reporter == workload
} else := {"status": "verified", "reason": "2 of 2 cited records match", "cited": 2, "found": 2, "matching": 2} if {
	observed_as == "peer"
} else := {"status": "unverified", "reason": "only the workload's own sidecar can see it"}

unverified(s, why) := object.union(s, {"verification": {"status": "unverified", "reason": why}})

kill := object.union(sig("sandbox_violation", flood, flood, "self", 100, 0), {"evidence": {"action": "kill", "syscall": "ptrace"}})

doc(s, history) := {
	"signal": s,
	"history": history,
	"workload": {"spiffe_id": s.workload, "revoked": false},
	"now_ms": now,
}

decide(inp) := d if {
	d := revocation.decision with input as inp
		with data.nexus.revocation.kinds as kinds
		with data.nexus.revocation.corroboration as corroboration
		with data.nexus.revocation.history_window_ms as 600000
		with data.nexus.revocation.ttl as "1h"
		with data.nexus.revocation.protected as [gateway]
}

decide_default_data(inp) := d if {
	d := revocation.decision with input as inp
		with data.nexus.revocation.kinds as kinds
		with data.nexus.revocation.corroboration as corroboration
		with data.nexus.revocation.history_window_ms as 600000
		with data.nexus.revocation.ttl as false
		with data.nexus.revocation.protected as false
}

has_reason(d, fragment) if {
	some r in d.reasons
	contains(r, fragment)
}

# --- strong single signals from the workload's own sidecar revoke ----------------------

test_rate_spike_seen_by_the_workloads_own_sidecar_revokes if {
	d := decide(doc(sig("rate_spike", flood, flood, "self", 9, 0), []))
	d.action == "revoke"
	d.ttl == "1h"
	has_reason(d, "rate_spike of spiffe://nexus.local/ns/plugins/sa/flood-model observed by its own sidecar: score 9 >= 8")
}

test_unbound_clause_reads_seen_by_the_own_sidecar_revoke if {
	decide(doc(sig("unbound_clause", flood, flood, "self", 1, 0), [])).action == "revoke"
}

test_large_egress_revokes_small_egress_alerts if {
	decide(doc(sig("egress_bytes", flood, flood, "self", 3.5, 0), [])).action == "revoke"
	decide(doc(sig("egress_bytes", flood, flood, "self", 1.5, 0), [])).action == "alert"
}

test_sandbox_kill_from_the_own_sidecar_revokes if {
	d := decide(doc(kill, []))
	d.action == "revoke"
	has_reason(d, "action kill on syscall ptrace, reported by its own sidecar")
}

test_the_default_ttl_applies_without_one_in_data if {
	# `ttl as false` stands for a missing or malformed one: the rule's default answers.
	d := decide_default_data(doc(sig("rate_spike", flood, flood, "self", 12, 0), []))
	d.action == "revoke"
	d.ttl == "1h"
}

test_an_own_signal_the_gateway_did_not_vouch_for_does_not_revoke if {
	# reporter = workload but the gateway found it not self-observable as claimed.
	s := unverified(sig("rate_spike", flood, flood, "self", 50, 0), "test")
	decide(doc(s, [])).action == "alert"
}

# --- one peer reporter, verified or not, is at most an alert ---------------------------

test_a_verified_tenfold_rate_spike_from_one_peer_only_alerts if {
	d := decide(doc(sig("rate_spike", flood, hazard, "peer", 10.2, 0), []))
	d.action == "alert"
	not d.ttl
	has_reason(d, "a single peer-observed signal never revokes")
	has_reason(d, "rate_spike of spiffe://nexus.local/ns/plugins/sa/flood-model observed as peer by spiffe://nexus.local/ns/data/sa/hazard-api")
}

test_a_verified_unbound_clause_burst_from_one_peer_only_alerts if {
	decide(doc(sig("unbound_clause", flood, hazard, "peer", 5, 0), [])).action == "alert"
}

test_an_unverified_peer_signal_alerts_with_why if {
	s := unverified(sig("rate_spike", hazard, flood, "peer", 9, 0), "none of the 3 cited records arrived")
	d := decide(doc(s, []))
	d.action == "alert"
	has_reason(d, "evidence not verified (none of the 3 cited records arrived): alert only")
}

test_two_kinds_from_one_peer_reporter_only_alert if {
	history := [sig("rate_spike", flood, hazard, "peer", 5, 60000)]
	d := decide(doc(sig("denial_burst", flood, hazard, "peer", 1, 0), history))
	d.action == "alert"
}

test_a_flood_of_one_peer_reporters_signals_only_alerts if {
	history := [sig(k, flood, hazard, "peer", 50, i * 1000) | some i in numbers.range(1, 20); some k in ["rate_spike", "denial_burst", "unbound_clause", "egress_bytes"]]
	decide(doc(sig("rate_spike", flood, hazard, "peer", 50, 0), history)).action == "alert"
}

# --- what no reporter can do -----------------------------------------------------------

test_sandbox_kill_reported_by_another_sidecar_is_ignored if {
	forged := object.union(kill, {"reporter": hazard})
	d := decide(doc(forged, []))
	d.action == "ignore"
	has_reason(d, "reported self-observed behaviour of spiffe://nexus.local/ns/plugins/sa/flood-model")
}

test_self_observations_about_another_workload_never_revoke if {
	d := decide(doc(sig("rate_spike", flood, hazard, "self", 50, 0), []))
	d.action == "ignore"
	has_reason(d, "only a workload's own sidecar can observe it")
}

test_a_sandbox_cannot_be_observed_by_a_peer if {
	peer_kill := object.union(kill, {"reporter": hazard, "observed_as": "peer"})
	d := decide(doc(peer_kill, []))
	d.action == "ignore"
	d.reasons == ["sandbox_violation cannot be observed as peer"]
}

test_an_unknown_observation_is_ignored if {
	d := decide(doc(sig("rate_spike", flood, hazard, "hearsay", 50, 0), []))
	d.action == "ignore"
	d.reasons == ["observed_as hearsay is neither peer nor self"]
}

test_a_mismatched_workload_document_is_ignored if {
	inp := object.union(doc(sig("rate_spike", flood, hazard, "peer", 50, 0), []), {"workload": {"spiffe_id": hazard}})
	d := decide(inp)
	d.action == "ignore"
	has_reason(d, "but the workload document is spiffe://nexus.local/ns/data/sa/hazard-api")
}

test_an_already_revoked_workload_is_ignored if {
	inp := object.union(doc(sig("rate_spike", flood, hazard, "peer", 50, 0), []), {"workload": {"revoked": true}})
	d := decide(inp)
	d.action == "ignore"
	d.reasons == ["spiffe://nexus.local/ns/plugins/sa/flood-model is already revoked"]
}

# --- weak signals alert, corroborated ones revoke --------------------------------------

test_a_weak_rate_spike_alerts if {
	d := decide(doc(sig("rate_spike", flood, flood, "self", 5, 0), []))
	d.action == "alert"
	not d.ttl
}

test_a_denial_burst_alone_alerts if {
	decide(doc(sig("denial_burst", flood, hazard, "peer", 2, 0), [])).action == "alert"
}

test_sandbox_eperm_alerts if {
	eperm := object.union(sig("sandbox_violation", flood, flood, "self", 1, 0), {"evidence": {"action": "eperm", "syscall": "connect"}})
	decide(doc(eperm, [])).action == "alert"
}

test_below_the_alert_score_is_ignored if {
	d := decide(doc(sig("rate_spike", flood, hazard, "peer", 2, 0), []))
	d.action == "ignore"
	d.reasons == ["rate_spike score 2 is below the alert threshold"]
}

test_two_kinds_from_the_own_sidecar_revoke if {
	history := [sig("rate_spike", flood, flood, "self", 5, 60000)]
	d := decide(doc(sig("denial_burst", flood, flood, "self", 1, 0), history))
	d.action == "revoke"
	d.reasons == ["denial_burst of spiffe://nexus.local/ns/plugins/sa/flood-model corroborated by 2 kinds from its own sidecar within the history window: denial_burst, rate_spike"]
}

test_a_verified_peer_corroborated_by_the_own_sidecar_revokes if {
	history := [sig("rate_spike", flood, flood, "self", 4.5, 2000)]
	d := decide(doc(sig("rate_spike", flood, hazard, "peer", 10, 0), history))
	d.action == "revoke"
	has_reason(d, "corroborated by 2 reporters within the history window: spiffe://nexus.local/ns/data/sa/hazard-api, spiffe://nexus.local/ns/plugins/sa/flood-model")
}

test_two_verified_reporters_of_one_kind_revoke if {
	history := [sig("denial_burst", flood, rates, "peer", 1.5, 1000)]
	d := decide(doc(sig("denial_burst", flood, hazard, "peer", 1, 0), history))
	d.action == "revoke"
	has_reason(d, "corroborated by 2 reporters within the history window: spiffe://nexus.local/ns/data/sa/hazard-api, spiffe://nexus.local/ns/data/sa/rates-api")
}

test_an_unverified_second_reporter_does_not_corroborate if {
	history := [unverified(sig("denial_burst", flood, rates, "peer", 1.5, 1000), "cited records do not match")]
	decide(doc(sig("denial_burst", flood, hazard, "peer", 1, 0), history)).action == "alert"
	# Nor does one still waiting for its evidence.
	waiting := [object.union(sig("denial_burst", flood, rates, "peer", 1.5, 1000), {"verification": {"status": "pending"}})]
	decide(doc(sig("denial_burst", flood, hazard, "peer", 1, 0), waiting)).action == "alert"
}

test_history_that_cannot_corroborate_leaves_an_alert if {
	history := [
		sig("rate_spike", flood, rates, "peer", 5, 700000), # too old
		sig("rate_spike", flood, rates, "self", 50, 0), # another workload's self-observation
		sig("rate_spike", hazard, rates, "peer", 50, 0), # about another workload
		sig("rate_spike", flood, rates, "peer", 3, 0), # below its alert score
		sig("auth_failures", flood, rates, "peer", 9, 0), # does not corroborate
		sig("mystery", flood, rates, "peer", 9, 0), # unknown kind
	]
	d := decide(doc(sig("denial_burst", flood, hazard, "peer", 1, 0), history))
	d.action == "alert"
}

test_the_same_reporter_repeating_one_kind_does_not_corroborate if {
	history := [sig("denial_burst", flood, hazard, "peer", 4, 1000), sig("denial_burst", flood, hazard, "peer", 2, 2000)]
	decide(doc(sig("denial_burst", flood, hazard, "peer", 8, 0), history)).action == "alert"
}

test_auth_failures_alert_even_when_corroborated if {
	history := [sig("denial_burst", flood, rates, "peer", 1, 1000)]
	d := decide(doc(sig("auth_failures", flood, hazard, "peer", 5, 0), history))
	d.action == "alert"
}

# --- protected, unattributable, unknown ------------------------------------------------

test_a_protected_workload_gets_an_alert_instead_of_a_revoke if {
	d := decide(doc(sig("rate_spike", gateway, gateway, "self", 20, 0), []))
	d.action == "alert"
	has_reason(d, "is protected (data.nexus.revocation.protected)")
	has_reason(d, "score 20 >= 8")
}

test_nothing_is_protected_without_a_list if {
	# `protected as false` stands for a missing or malformed list: nobody is protected.
	decide_default_data(doc(sig("rate_spike", gateway, gateway, "self", 20, 0), [])).action == "revoke"
}

test_unattributed_auth_failures_alert if {
	d := decide(doc(sig("auth_failures", "unknown", hazard, "peer", 3, 0), []))
	d.action == "alert"
	has_reason(d, "unknown is not a SPIFFE ID: alert only")
}

test_a_non_spiffe_workload_is_never_revoked if {
	decide(doc(sig("unbound_clause", "unknown", hazard, "peer", 5, 0), [])).action == "alert"
}

test_an_unknown_kind_alerts if {
	d := decide(doc(sig("mystery", flood, hazard, "peer", 50, 0), []))
	d.action == "alert"
	d.reasons == ["unknown signal kind mystery"]
}

test_missing_thresholds_alert if {
	d := revocation.decision with input as doc(sig("rate_spike", flood, hazard, "peer", 50, 0), [])
		with data.nexus.revocation.kinds as false
	d.action == "alert"
	d.reasons == ["no thresholds at data.nexus.revocation.kinds: load policies/revocation as the policy folder"]
}

# --- the shipped data ------------------------------------------------------------------

# When this folder is the root, data.yaml's thresholds are the ones tested here.
test_the_shipped_thresholds_are_the_tested_ones if {
	shipped_as_tested
}

shipped_as_tested if not data.nexus.revocation.kinds

shipped_as_tested if {
	data.nexus.revocation.kinds == kinds
	data.nexus.revocation.corroboration == corroboration
	data.nexus.revocation.history_window_ms == 600000
	data.nexus.revocation.ttl == "1h"
}

# --- declared budgets (docs/anomaly.md) -------------------------------------------------

test_budget_twice_over_from_its_own_sidecar_revokes if {
	d := decide(doc(sig("budget_exceeded", flood, flood, "self", 2.1, 0), []))
	d.action == "revoke"
	d.reasons == ["budget_exceeded of spiffe://nexus.local/ns/plugins/sa/flood-model observed by its own sidecar: score 2.1 >= 2"]
}

test_budget_just_over_is_an_alert if {
	d := decide(doc(sig("budget_exceeded", flood, flood, "self", 1.2, 0), []))
	d.action == "alert"
}

test_budget_overrun_seen_by_one_peer_does_not_revoke_alone if {
	d := decide(doc(sig("budget_exceeded", flood, hazard, "peer", 5, 0), []))
	d.action == "alert"
}

test_budget_overrun_claimed_by_another_sidecar_as_self_is_ignored if {
	d := decide(doc(sig("budget_exceeded", flood, hazard, "self", 50, 0), []))
	d.action == "ignore"
}

test_a_burst_over_budget_and_its_rate_spike_are_not_two_kinds if {
	spike := sig("rate_spike", flood, flood, "self", 4, 1000)
	d := decide(doc(sig("budget_exceeded", flood, flood, "self", 1.1, 0), [spike]))
	d.action == "alert"
}
