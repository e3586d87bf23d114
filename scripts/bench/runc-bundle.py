#!/usr/bin/env python3
"""Writes an OCI runtime config.json for the plain-loop-mount baseline of
scripts/bench-lazy.sh, shaped like the one `smr run` builds (namespaces pid,
mount, ipc and uts; host network; writable overlay root; no terminal).
Usage: runc-bundle.py BUNDLE_DIR ROOTFS ARG..."""
import json, subprocess, sys, os

bundle, rootfs, args = sys.argv[1], sys.argv[2], sys.argv[3:]
subprocess.run(["runc", "spec", "--bundle", bundle], check=True)
path = os.path.join(bundle, "config.json")
c = json.load(open(path))
c["root"] = {"path": rootfs, "readonly": False}
c["process"]["terminal"] = False
c["process"]["args"] = args
c["process"]["env"] = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
c["hostname"] = "smr"
c["linux"]["namespaces"] = [{"type": t} for t in ("pid", "mount", "ipc", "uts")]
json.dump(c, open(path, "w"), indent=1)
