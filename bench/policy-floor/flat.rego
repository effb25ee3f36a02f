# The reference policy's allow path (policies/nexus/authz) written as one rule body: the
# same lookups and comparisons, no helper rules, no denial reasons.
package nexus.authz

import rego.v1

decision := {"allow": true, "reasons": ["granted"]} if {
	not data.nexus.revoked[input.source.spiffe_id]
	not data.nexus.revoked[input.destination.spiffe_id]
	is_string(input.clause)
	input.clause in data.nexus.bindings[input.source.spiffe_id]
	ex := data.nexus.executions[input.execution.id]
	ex.plugin == input.source.spiffe_id
	ex.clause == input.clause
	ex.not_after_ns > input.time_ns
	input.request.method in data.nexus.allowed_methods
}
