# Automatic revocation: the gateway evaluates `decision` for every anomaly signal a
# sidecar reports (input.signal, with input.signal.reporter = the SPIFFE ID of the
# sending sidecar's certificate and input.signal.verification = what the gateway checked
# of its evidence), given the recent signals about the same workload (input.history,
# newest first, each with its own verification) and whether it is revoked already
# (input.workload). policies/README.md documents the input; docs/threat-model.md why.
#
# Who may say what:
#   - the workload's own sidecar (reporter = workload, observed_as self; verification
#     "not_required") carries all its traffic: its strong signals revoke alone;
#   - another sidecar (observed_as peer) counts only when the gateway verified that the
#     decision ids it cites are its own shipped records of requests with the workload
#     (verification "verified"); even then one such reporter never revokes alone: it
#     revokes when corroborated by the workload's own sidecar or by a second,
#     independent reporter;
#   - anything unverified is at most an alert.
#
#   ignore  the workload is revoked already; the signal is not credible (a reporter
#           describing another workload's self-observed behaviour, an observation its
#           reporter cannot make, a workload document that does not match); or its
#           score is below the kind's alert_score
#   revoke  one strong signal from the workload's own sidecar (score >= revoke_score,
#           or a sandbox `kill`), several kinds from the workload's own sidecar, or
#           credible signals from at least two distinct reporters within the history
#           window
#   alert   everything else credible or alert-grade; also instead of revoke for a
#           protected workload, a signal not about a SPIFFE ID, an unknown kind, or
#           missing thresholds
#
# Thresholds: data.nexus.revocation (data.yaml here). Rules read its leaves only: the
# package itself lives under data.nexus.revocation too.
package nexus.revocation

import rego.v1

signal := input.signal

cfg_kinds := data.nexus.revocation.kinds

kind_cfg := cfg_kinds[signal.kind]

default protected_ids := []

protected_ids := p if {
	p := data.nexus.revocation.protected
	is_array(p)
}

default revoke_ttl := "1h"

revoke_ttl := t if {
	t := data.nexus.revocation.ttl
	is_string(t)
}

decision := {"action": "ignore", "reasons": sort(ignore_reasons)} if {
	count(ignore_reasons) > 0
} else := {"action": "alert", "reasons": array.concat(sort(revoke_reasons), [protected_reason])} if {
	count(revoke_reasons) > 0
	signal.workload in protected_ids
} else := {"action": "revoke", "reasons": sort(revoke_reasons), "ttl": revoke_ttl} if {
	count(revoke_reasons) > 0
} else := {"action": "alert", "reasons": sort(alert_reasons)} if {
	count(alert_reasons) > 0
} else := {"action": "ignore", "reasons": [sprintf("%s score %v is below the alert threshold", [signal.kind, signal.score])]}

protected_reason := sprintf("%s is protected (data.nexus.revocation.protected): alert instead of revoke", [signal.workload])

# --- ignore ----------------------------------------------------------------------------

ignore_reasons contains sprintf("%s is already revoked", [signal.workload]) if {
	input.workload.revoked == true
}

ignore_reasons contains sprintf("signal is about %s but the workload document is %s", [signal.workload, input.workload.spiffe_id]) if {
	signal.workload != input.workload.spiffe_id
}

ignore_reasons contains sprintf("%s reported self-observed behaviour of %s: only a workload's own sidecar can observe it", [signal.reporter, signal.workload]) if {
	foreign_self(signal)
}

ignore_reasons contains sprintf("observed_as %v is neither peer nor self", [signal.observed_as]) if {
	not signal.observed_as in {"peer", "self"}
}

ignore_reasons contains sprintf("%s cannot be observed as %s", [signal.kind, signal.observed_as]) if {
	kind_cfg
	signal.observed_as in {"peer", "self"}
	not observable
}

# --- revoke ----------------------------------------------------------------------------

revoke_reasons contains sprintf("%s of %s observed by its own sidecar: score %v >= %v", [signal.kind, signal.workload, signal.score, kind_cfg.revoke_score]) if {
	attributable
	own(signal)
	is_number(kind_cfg.revoke_score)
	signal.score >= kind_cfg.revoke_score
}

revoke_reasons contains sprintf("%s of %s: action %s on syscall %v, reported by its own sidecar", [signal.kind, signal.workload, signal.evidence.action, signal.evidence.syscall]) if {
	attributable
	own(signal)
	signal.evidence.action in kind_cfg.revoke_actions
}

revoke_reasons contains sprintf("%s of %s corroborated by %d kinds from its own sidecar within the history window: %s", [signal.kind, signal.workload, count(own_kinds_seen), concat(", ", sort(own_kinds_seen))]) if {
	attributable
	credible(signal)
	count(own_kinds_seen) >= data.nexus.revocation.corroboration.distinct_kinds
}

revoke_reasons contains sprintf("%s of %s corroborated by %d reporters within the history window: %s", [signal.kind, signal.workload, count(reporters_seen), concat(", ", sort(reporters_seen))]) if {
	attributable
	credible(signal)
	count(reporters_seen) >= data.nexus.revocation.corroboration.distinct_reporters
}

# --- alert -----------------------------------------------------------------------------

alert_reasons contains sprintf("%s of %s observed as %s by %s: score %v >= %v", [signal.kind, signal.workload, signal.observed_as, signal.reporter, signal.score, kind_cfg.alert_score]) if {
	signal.score >= kind_cfg.alert_score
}

alert_reasons contains sprintf("a single peer-observed signal never revokes: it needs %s's own sidecar or a second reporter to agree", [signal.workload]) if {
	signal.observed_as == "peer"
	verified(signal)
	signal.score >= kind_cfg.alert_score
}

alert_reasons contains sprintf("evidence not verified (%v): alert only", [verification_reason]) if {
	signal.observed_as == "peer"
	not verified(signal)
	signal.score >= kind_cfg.alert_score
}

alert_reasons contains sprintf("%s is not a SPIFFE ID: alert only", [signal.workload]) if {
	not attributable
}

alert_reasons contains sprintf("unknown signal kind %v", [signal.kind]) if {
	cfg_kinds
	not cfg_kinds[signal.kind]
}

alert_reasons contains "no thresholds at data.nexus.revocation.kinds: load policies/revocation as the policy folder" if {
	not cfg_kinds
}

# --- helpers ---------------------------------------------------------------------------

default verification_reason := "the gateway recorded no verification"

verification_reason := signal.verification.reason

attributable if startswith(signal.workload, "spiffe://")

# (A rule rather than `not x in kind_cfg.observers` inline: regorus's compiled mode
# took that as true for an unknown kind, where OPA and the interpreter are undefined.)
observable if signal.observed_as in kind_cfg.observers

# An observation of a workload's own behaviour made by someone else's sidecar.
foreign_self(s) if {
	s.observed_as == "self"
	s.reporter != s.workload
}

# Observed by the workload's own sidecar (the gateway says no evidence is needed).
own(s) if {
	s.observed_as == "self"
	s.reporter == s.workload
	s.verification.status == "not_required"
}

# A peer observation whose cited records the gateway found and matched.
verified(s) if {
	s.observed_as == "peer"
	s.verification.status == "verified"
}

# A signal (the current one or one from the history) that may corroborate: about this
# workload, recent, of a kind that corroborates, observable as reported, from the
# workload's own sidecar or verified, and at least alert-grade.
credible(s) if {
	k := cfg_kinds[s.kind]
	k.corroborates == true
	s.workload == signal.workload
	input.now_ms - s.time_ms <= data.nexus.revocation.history_window_ms
	s.observed_as in k.observers
	trusted(s)
	s.score >= k.alert_score
}

trusted(s) if own(s)

trusted(s) if verified(s)

corroborating contains [s.kind, s.reporter] if {
	some s in array.concat([signal], input.history)
	credible(s)
}

own_kinds_seen := {e[0] | some e in corroborating; e[1] == signal.workload}

reporters_seen := {e[1] | some e in corroborating}
