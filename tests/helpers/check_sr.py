"""Reads DICOM SR files with highdicom (PyPI) as a TID 1500 Imaging Measurement Report and
prints what it found as one JSON list: a file highdicom cannot parse as TID 1500 raises.

    check_sr.py FILE...
"""

import json
import sys

import highdicom as hd


def walk(items):
    for item in items:
        yield item
        yield from walk(getattr(item, "ContentSequence", []))


def probabilities(sr):
    """The model's probability of each finding: the NUM (CXR-PROB) each CODE or NUM item of the
    report has as its property, read from the data set as written."""
    found = {}
    for item in walk(sr.ContentSequence):
        for child in getattr(item, "ContentSequence", []):
            concept = child.ConceptNameCodeSequence[0]
            if child.ValueType == "NUM" and concept.CodeValue == "CXR-PROB":
                meaning = item.ConceptNameCodeSequence[0].CodeMeaning
                found[meaning] = float(child.MeasuredValueSequence[0].NumericValue)
    return found


out = []
for path in sys.argv[1:]:
    sr = hd.sr.srread(path)
    report = hd.sr.MeasurementReport.from_sequence([sr])
    groups = report.get_image_measurement_groups()
    group = groups[0]
    algorithm = [
        i.TextValue
        for i in walk(sr.ContentSequence)
        if i.ValueType == "TEXT" and i.ConceptNameCodeSequence[0].CodeValue == "111001"
    ]
    out.append(
        {
            "file": path,
            "sop_class": sr.SOPClassUID,
            "sop_instance": sr.SOPInstanceUID,
            "study": sr.StudyInstanceUID,
            "template": sr.ContentTemplateSequence[0].TemplateIdentifier,
            "groups": len(groups),
            "tracking_identifier": group.tracking_identifier,
            "tracking_uid": group.tracking_uid,
            "source_images": [s.referenced_sop_instance_uid for s in group.source_images],
            "qualitative": {
                q.name.meaning: [q.value.value, q.value.scheme_designator]
                for q in group.get_qualitative_evaluations()
            },
            "probabilities": probabilities(sr),
            "measurements": {
                m.name.meaning: [m.value, m.unit.value] for m in group.get_measurements()
            },
            "observers": len(report.get_observer_contexts()),
            "algorithm": algorithm,
            "patient_id": sr.PatientID,
            "patient_name": str(sr.PatientName),
            "patient_birth_date": str(sr.PatientBirthDate),
        }
    )
print(json.dumps(out))
