# The floor of one decision in regorus's RVM: a rule that reads nothing (bench/README.md,
# "The policy floor").
package nexus.authz

import rego.v1

decision := {"allow": true, "reasons": ["constant"]}
