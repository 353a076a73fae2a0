#!/usr/bin/env python3
"""Package meshpatterns filters as OCI images that Istio's Wasm fetcher accepts.

Each filter becomes one OCI image layout directory, target/oci/<filter>/, whose
image is the "compat" variant Istio reads: an ordinary OCI image manifest with
a single `application/vnd.oci.image.layer.v1.tar+gzip` layer, and that layer is
a tar holding one file, `plugin.wasm`. No Docker engine is involved; skopeo
copies the layout to a registry:

    skopeo copy oci:target/oci/consistent-hash:0.1.0 docker://registry/meshpatterns/consistent-hash:0.1.0

Digests are reproducible: the tar entry has fixed mtime (0), owner (0:0, no
names) and mode (0644); gzip is written without a timestamp or file name; every
JSON document has sorted keys and no whitespace. The same module always gives
the same manifest digest, which is what a WasmPlugin `sha256` pins for an
oci:// URL (Istio compares it with the hex of the image manifest digest).

    build.py --wasm-dir target/meshpatterns --out target/oci --tag 0.1.0 consistent-hash ...
    build.py ... --pin istio        also rewrite the sha256 lines of the WasmPlugins in istio/*.yaml

Writes <out>/digests.json: {filter: {manifest, module, tag, layout}}.
Python 3 standard library only.
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tarfile

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
PLUGIN_FILE = "plugin.wasm"


def canonical_json(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def module_file(filter_name):
    """filters/rate-limiter builds rate_limiter.wasm."""
    return filter_name.replace("-", "_") + ".wasm"


def layer_tar(module):
    """A tar with plugin.wasm only, owned by 0:0, mtime 0, mode 0644."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo(PLUGIN_FILE)
        info.size = len(module)
        info.mtime = 0
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.type = tarfile.REGTYPE
        tar.addfile(info, io.BytesIO(module))
    return buf.getvalue()


def image_blobs(filter_name, module, source):
    """(manifest bytes, {digest hex: blob bytes}) for one module."""
    tar = layer_tar(module)
    layer = gzip.compress(tar, compresslevel=9, mtime=0)
    config = canonical_json(
        {
            "architecture": "wasm",
            "os": "wasip1",
            "rootfs": {"type": "layers", "diff_ids": ["sha256:" + sha256(tar)]},
            "config": {"Labels": {"org.opencontainers.image.title": filter_name}},
        }
    )
    annotations = {"org.opencontainers.image.title": filter_name}
    if source:
        annotations["org.opencontainers.image.source"] = source
    manifest = canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": {"mediaType": CONFIG_TYPE, "digest": "sha256:" + sha256(config), "size": len(config)},
            "layers": [{"mediaType": LAYER_TYPE, "digest": "sha256:" + sha256(layer), "size": len(layer)}],
            "annotations": annotations,
        }
    )
    blobs = {sha256(b): b for b in (config, layer, manifest)}
    return manifest, blobs


def write_layout(directory, tag, manifest, blobs):
    """An OCI image layout (oci-layout, index.json, blobs/sha256/*) with one tagged manifest."""
    if os.path.isdir(directory):
        shutil.rmtree(directory)
    os.makedirs(os.path.join(directory, "blobs", "sha256"))
    for digest, data in sorted(blobs.items()):
        with open(os.path.join(directory, "blobs", "sha256", digest), "wb") as f:
            f.write(data)
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": MANIFEST_TYPE,
                "digest": "sha256:" + sha256(manifest),
                "size": len(manifest),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    with open(os.path.join(directory, "index.json"), "wb") as f:
        f.write(canonical_json(index))
    with open(os.path.join(directory, "oci-layout"), "wb") as f:
        f.write(canonical_json({"imageLayoutVersion": "1.0.0"}))


# --- pinning -----------------------------------------------------------------

URL_LINE = re.compile(r"^(?P<indent>\s+)url:\s*(?P<url>\S+)\s*(#.*)?$")
SHA_LINE = re.compile(r"^(?P<indent>\s+)sha256:.*$")


def filter_of_url(url):
    """oci://host/org/consistent-hash:0.1.0 or https://.../consistent_hash.wasm -> consistent-hash."""
    last = url.rstrip("/").rsplit("/", 1)[-1]
    name = re.split(r"[:@]", last, maxsplit=1)[0]
    if name.endswith(".wasm"):
        name = name[: -len(".wasm")]
    return name.replace("_", "-")


def pin_value(url, digests):
    """What Istio compares the WasmPlugin sha256 with: for oci:// the hex of the
    image manifest digest, for http(s):// and file:// the sha256 of the module file."""
    entry = digests.get(filter_of_url(url))
    if entry is None:
        return None
    return entry["manifest"] if url.startswith("oci://") else entry["module"]


def pin_text(text, digests, where, problems):
    """Rewrite (or insert after `url:`) the sha256 line of every WasmPlugin document.
    Only sha256 lines change; every other byte is kept. WasmPlugins whose url
    names no built filter are left alone and reported in `problems`."""
    out, changes = [], []
    docs = re.split(r"(?m)^(?=---\s*$)", text)
    for doc in docs:
        lines = doc.splitlines(keepends=True)
        if not re.search(r"(?m)^kind:\s*WasmPlugin\s*$", doc):
            out.extend(lines)
            continue
        # spec.url: the `url:` line indented like the first child of `spec:`
        # (a `url:` inside pluginConfig or a comment is not it).
        spec_at = next((i for i, l in enumerate(lines) if re.match(r"^spec:\s*(#.*)?$", l)), None)
        child = next((l for l in lines[spec_at + 1 :] if l.strip() and not l.lstrip().startswith("#")), "") if spec_at is not None else ""
        spec_indent = child[: len(child) - len(child.lstrip())]
        url_at = next(
            (i for i, l in enumerate(lines) if spec_at is not None and i > spec_at and URL_LINE.match(l) and URL_LINE.match(l).group("indent") == spec_indent),
            None,
        )
        if url_at is None:
            out.extend(lines)
            continue
        m = URL_LINE.match(lines[url_at])
        url, indent = m.group("url"), m.group("indent")
        value = pin_value(url, digests)
        if value is None:
            problems.append(f"{where}: WasmPlugin url {url} names no filter that was built ({', '.join(sorted(digests))}); add it to FILTERS")
            out.extend(lines)
            continue
        sha_at = next((i for i, l in enumerate(lines) if SHA_LINE.match(l) and SHA_LINE.match(l).group("indent") == indent), None)
        new_line = f"{indent}sha256: {value}\n"
        if sha_at is None:
            lines.insert(url_at + 1, new_line)
            changes.append(f"{where}: {filter_of_url(url)} pinned {value}")
        elif lines[sha_at] != new_line:
            lines[sha_at] = new_line
            changes.append(f"{where}: {filter_of_url(url)} re-pinned {value}")
        out.extend(lines)
    return "".join(out), changes


def pin_dir(directory, digests):
    """Pin every WasmPlugin in directory/*.yaml; returns the problems found."""
    problems = []
    for name in sorted(os.listdir(directory)):
        if not name.endswith((".yaml", ".yml")):
            continue
        path = os.path.join(directory, name)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        new, changes = pin_text(text, digests, path, problems)
        if new != text:
            tmp = path + ".pin-tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(new)
            os.replace(tmp, path)
        for c in changes:
            print("  " + c)
    return problems


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--wasm-dir", required=True, help="directory with <filter>.wasm (make build writes target/meshpatterns)")
    p.add_argument("--out", required=True, help="output directory: one OCI layout per filter plus digests.json")
    p.add_argument("--tag", required=True, help="image tag (the workspace version)")
    p.add_argument("--source", default="", help="org.opencontainers.image.source annotation")
    p.add_argument("--pin", metavar="DIR", help="rewrite the WasmPlugin sha256 lines of DIR/*.yaml")
    p.add_argument("filters", nargs="+")
    a = p.parse_args()

    os.makedirs(a.out, exist_ok=True)
    digests = {}
    for name in a.filters:
        path = os.path.join(a.wasm_dir, module_file(name))
        try:
            with open(path, "rb") as f:
                module = f.read()
        except OSError as e:
            raise SystemExit(f"{path}: {e.strerror}; run `make build` first")
        manifest, blobs = image_blobs(name, module, a.source)
        layout = os.path.join(a.out, name)
        write_layout(layout, a.tag, manifest, blobs)
        digests[name] = {"manifest": sha256(manifest), "module": sha256(module), "tag": a.tag, "layout": layout}
        print(f"  {name:<22} oci:{layout}:{a.tag}  manifest sha256:{sha256(manifest)}  module sha256:{sha256(module)}")
    with open(os.path.join(a.out, "digests.json"), "wb") as f:
        f.write(canonical_json(digests) + b"\n")
    if a.pin:
        problems = pin_dir(a.pin, digests)
        for p in problems:
            print(p, file=sys.stderr)
        if problems:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
