# One comparison of an input field in the decision rule's body.
package nexus.authz

import rego.v1

decision := {"allow": true, "reasons": ["get"]} if {
	input.request.method == "GET"
}
