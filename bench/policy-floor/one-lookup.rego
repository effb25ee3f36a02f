# One lookup of the caller in data.nexus.bindings (10,000 entries in decision_bench),
# through a helper rule.
package nexus.authz

import rego.v1

decision := {"allow": true, "reasons": ["bound"]} if {
	bound
}

bound if data.nexus.bindings[input.source.spiffe_id]
