"""Writes ocsf-1.8.0-subset.json from a clone of https://github.com/ocsf/ocsf-schema:
the attribute names (and their requirement) of the classes and objects
agentwarden exports. Run in the clone: python3 extract_ocsf_subset.py 3dcb905d (v1.8.0)"""
import json, subprocess, sys
C = sys.argv[1]
def show(path): return json.loads(subprocess.check_output(["git", "show", f"{C}:{path}"]))
files = subprocess.check_output(["git", "ls-tree", "-r", "--name-only", C]).decode().split()
by_name = {}
for f in files:
    if f.endswith(".json") and (f.startswith("objects/") or f.startswith("events/")):
        d = show(f)
        if isinstance(d, dict) and "name" in d:
            by_name.setdefault((f.split("/")[0], d["name"]), f)
def attrs(kind, name, seen=()):
    d = show(by_name[(kind, name)])
    merged = {}
    parent = d.get("extends")
    if parent and parent != "object" and (kind, parent) in by_name:
        merged.update(attrs(kind, parent))
    own = d.get("attributes", {})
    for inc in own.get("$include", []):
        for k, v in show(inc).get("attributes", {}).items():
            if k != "$include": merged.setdefault(k, "profile " + inc.split("/")[-1][:-5])
    for k, v in own.items():
        if k == "$include": continue
        req = v.get("requirement") if isinstance(v, dict) else None
        merged[k] = req or merged.get(k, "optional")
    return merged
dictionary = show("dictionary.json")["attributes"]
categories = {k: v["uid"] for k, v in show("categories.json")["attributes"].items()}
out = {"source": {"repository": "https://github.com/ocsf/ocsf-schema", "commit": subprocess.check_output(["git", "rev-parse", C]).decode().strip(),
                  "version": show("version.json")["version"],
                  "files": "events/base_event.json, events/system/{system,process_activity,file_activity}.json, events/findings/{finding,detection_finding}.json, objects/*.json, profiles/*.json, categories.json, dictionary.json",
                  "note": "attribute names and their requirement only; extends resolved; attributes of an included profile marked \"profile NAME\" (required only when that profile is applied)"},
       "classes": {}, "objects": {}, "types": {}}
for name in ("process_activity", "file_activity", "detection_finding"):
    d = show(by_name[("events", name)])
    parent = show(by_name[("events", d["extends"])])
    cat = d.get("category") or parent.get("category")
    enum = d["attributes"].get("activity_id", {}).get("enum") or parent["attributes"].get("activity_id", {}).get("enum", {})
    out["classes"][name] = {"category": cat, "category_uid": categories[cat],
                            "class_uid": categories[cat] * 1000 + d["uid"],
                            "activities": {k: v["caption"] for k, v in enum.items()},
                            "attributes": attrs("events", name)}
for name in ("metadata", "product", "process", "file", "device", "actor", "user", "finding_info", "evidences", "analytic"):
    out["objects"][name] = {"attributes": attrs("objects", name)}
used = set()
for group in list(out["classes"].values()) + list(out["objects"].values()):
    used |= set(group["attributes"])
out["types"] = {k: dictionary[k]["type"] for k in sorted(used) if k in dictionary and dictionary[k]["type"] in out["objects"]}
out["severity_id"] = {k: v["caption"] for k, v in dictionary["severity_id"]["enum"].items()}
json.dump(out, sys.stdout, indent=1, sort_keys=True)
