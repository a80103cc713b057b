"""Checks exported events against the published schemas' own names: a cited
subset of OCSF 1.8.0 and ECS 9.4.0 in tests/data/ (see the `source` in each
file, and the extract_*.py next to them that made it)."""
from __future__ import annotations

import json
from pathlib import Path

DATA = Path(__file__).parent / "data"
OCSF = json.loads((DATA / "ocsf-1.8.0-subset.json").read_text())
ECS = json.loads((DATA / "ecs-9.4.0-subset.json").read_text())
OCSF_CLASSES = {c["class_uid"]: (name, c) for name, c in OCSF["classes"].items()}
ECS_FIELDS = set(ECS["fields"])


def _object_problems(value: dict, object_name: str, where: str) -> list[str]:
    attributes = OCSF["objects"][object_name]["attributes"]
    problems = [f"{where}: {key!r} is not an attribute of OCSF object {object_name}"
                for key in value if key not in attributes]
    problems += [f"{where}: required {key!r} missing" for key, req in attributes.items()
                 if req == "required" and key not in value]
    for key, inner in value.items():
        problems += _nested(key, inner, f"{where}.{key}")
    return problems


def _nested(key: str, value, where: str) -> list[str]:
    kind = OCSF["types"].get(key)
    if kind is None:
        return []
    if isinstance(value, list):
        return [p for i, item in enumerate(value) for p in _object_problems(item, kind, f"{where}[{i}]")]
    if not isinstance(value, dict):
        return [f"{where}: an OCSF {kind} object expected, got {value!r}"]
    return _object_problems(value, kind, where)


def ocsf_problems(event: dict) -> list[str]:
    """What in event does not follow OCSF 1.8.0 (empty: nothing found)."""
    found = OCSF_CLASSES.get(event.get("class_uid"))
    if found is None:
        return [f"class_uid {event.get('class_uid')!r} is not one of {sorted(OCSF_CLASSES)}"]
    name, klass = found
    attributes = klass["attributes"]
    problems = [f"{name}: {key!r} is not an attribute of the class" for key in event if key not in attributes]
    problems += [f"{name}: required {key!r} missing" for key, req in attributes.items()
                 if req == "required" and key not in event]
    if event.get("category_uid") != klass["category_uid"]:
        problems.append(f"{name}: category_uid {event.get('category_uid')} != {klass['category_uid']}")
    activity = str(event.get("activity_id"))
    if activity not in klass["activities"]:
        problems.append(f"{name}: activity_id {activity} not in {klass['activities']}")
    elif event.get("activity_name") != klass["activities"][activity]:
        problems.append(f"{name}: activity_name {event.get('activity_name')!r} != {klass['activities'][activity]!r}")
    if event.get("type_uid") != klass["class_uid"] * 100 + int(event.get("activity_id", -1)):
        problems.append(f"{name}: type_uid {event.get('type_uid')} is not class_uid * 100 + activity_id")
    severity = str(event.get("severity_id"))
    if OCSF["severity_id"].get(severity) != event.get("severity"):
        problems.append(f"{name}: severity_id {severity} / severity {event.get('severity')!r}")
    if not (isinstance(event.get("time"), int) and 10**12 < event["time"] < 10**13):
        problems.append(f"{name}: time {event.get('time')!r} is not milliseconds since the epoch")
    for key, value in event.items():
        problems += _nested(key, value, key)
    return problems


def _flatten(doc: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in doc.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def ecs_problems(doc: dict) -> list[str]:
    """What in doc does not follow ECS 9.4.0: field names, and the allowed
    values of event.kind/category/type/outcome (empty: nothing found)."""
    flat = _flatten(doc)
    problems = [f"{key!r} is not an ECS field" for key in flat
                if not key.startswith("agentwarden.") and key not in ECS_FIELDS]
    allowed = ECS["allowed_values"]
    for field in ("event.kind", "event.outcome"):
        if flat.get(field) not in allowed[field]:
            problems.append(f"{field} {flat.get(field)!r} not in {allowed[field]}")
    categories = flat.get("event.category") or []
    expected = set()
    for category in categories:
        if category not in allowed["event.category"]:
            problems.append(f"event.category {category!r} not allowed")
        expected |= set(ECS["expected_event_types"].get(category, ()))
    for kind in flat.get("event.type") or []:
        if kind not in expected:
            problems.append(f"event.type {kind!r} is not expected with categories {categories}")
    if not categories or not flat.get("event.type") or "@timestamp" not in flat:
        problems.append("event.category, event.type and @timestamp are needed")
    return problems
