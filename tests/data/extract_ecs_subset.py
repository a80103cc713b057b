"""Writes ecs-subset.json from a clone of https://github.com/elastic/ecs:
field names of the field sets agentwarden uses, and the allowed values of the
event.* categorisation fields. Run in the clone: python3 extract_ecs_subset.py v9.4.0"""
import csv, io, json, subprocess, sys
import yaml
tag = sys.argv[1]
show = lambda p: subprocess.check_output(["git", "show", f"{tag}:{p}"]).decode()
rows = list(csv.DictReader(io.StringIO(show("generated/csv/fields.csv"))))
sets = ("base", "ecs", "event", "process", "file", "host", "agent", "user", "group", "rule")
fields = sorted(r["Field"] for r in rows if r["Field_Set"] in sets and ".entity." not in r["Field"])
flat = yaml.safe_load(show("generated/ecs/ecs_flat.yml"))
allowed = {name: sorted(v["name"] for v in flat[name]["allowed_values"])
           for name in ("event.kind", "event.category", "event.type", "event.outcome")}
cats = {v["name"]: sorted(v.get("expected_event_types") or []) for v in flat["event.category"]["allowed_values"]}
print(json.dumps({"source": {"repository": "https://github.com/elastic/ecs", "tag": tag,
                             "commit": subprocess.check_output(["git", "rev-parse", tag + "^{commit}"]).decode().strip(),
                             "files": "generated/csv/fields.csv (field names of the field sets listed, "
                                      "entity sub-fields left out), generated/ecs/ecs_flat.yml (allowed values)",
                             "field_sets": list(sets), "version": rows[0]["ECS_Version"]},
                  "fields": fields, "allowed_values": allowed, "expected_event_types": cats}, indent=1))
