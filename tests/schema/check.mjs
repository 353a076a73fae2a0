// Validate Kubernetes/Istio manifests against the upstream schemas shipped in
// npm packages: @kubernetes-models/istio (generated from Istio's CRDs),
// @kubernetes-models/gateway-api (Gateway API CRDs) and kubernetes-models
// (generated from the Kubernetes OpenAPI), installed into
// tests/schema/node_modules by `make schema-deps` from package-lock.json.
//
//   node tests/schema/check.mjs istio/*.yaml
//
// Two passes per YAML document:
//  1. strict shape: the document is type-checked by the TypeScript compiler
//     against the package's interface for its apiVersion/kind (IWasmPlugin,
//     IDestinationRule, IDeployment, ...). Excess-property checking rejects
//     misspelt or unknown fields at any depth; literal unions reject bad enum
//     values. (The CRD OpenAPI schemas do not close objects, so a JSON Schema
//     pass alone would accept `failStratgy`.)
//  2. value constraints: the package's JSON Schema validator (required fields,
//     patterns, formats, ranges).
// Every error is printed as `file: Kind/name (document N) at field.path: message`.
// `pluginConfig` is opaque here; tests/tests/istio.rs and the `validate` command
// parse it with each filter's own config code.

import fs from "node:fs";
import path from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import ts from "typescript";
import { parseAllDocuments } from "yaml";

const here = path.dirname(fileURLToPath(import.meta.url));

/** npm module (under node_modules) holding the model for apiVersion/kind, or null. */
function modelModule(apiVersion, kind) {
  const [group, version] = apiVersion.includes("/") ? apiVersion.split("/") : ["", apiVersion];
  let mod;
  if (group.endsWith(".istio.io")) mod = `@kubernetes-models/istio/${group}/${version}/${kind}`;
  else if (group === "gateway.networking.k8s.io") mod = `@kubernetes-models/gateway-api/${group}/${version}/${kind}`;
  else mod = `kubernetes-models/${group ? group + "/" : ""}${version}/${kind}`;
  return fs.existsSync(path.join(here, "node_modules", mod + ".d.ts")) ? mod : null;
}

/** JSON text with one value per line, and the field path of every line. */
function render(value) {
  const lines = [];
  const paths = [];
  const join = (p, k) => (typeof k === "number" ? `${p}[${k}]` : p ? `${p}.${k}` : k);
  function emit(v, p, indent, prefix, suffix) {
    const pad = "  ".repeat(indent);
    if (Array.isArray(v) && v.length) {
      lines.push(pad + prefix + "["), paths.push(p);
      v.forEach((x, i) => emit(x, join(p, i), indent + 1, "", i < v.length - 1 ? "," : ""));
      lines.push(pad + "]" + suffix), paths.push(p);
    } else if (v && typeof v === "object" && !Array.isArray(v) && Object.keys(v).length) {
      const keys = Object.keys(v);
      lines.push(pad + prefix + "{"), paths.push(p);
      keys.forEach((k, i) => emit(v[k], join(p, k), indent + 1, JSON.stringify(k) + ": ", i < keys.length - 1 ? "," : ""));
      lines.push(pad + "}" + suffix), paths.push(p);
    } else {
      lines.push(pad + prefix + JSON.stringify(v) + suffix), paths.push(p);
    }
  }
  emit(value, "", 0, "", "");
  return { lines, paths };
}

const files = process.argv.slice(2);
if (!files.length) {
  console.error("usage: node check.mjs FILE.yaml...");
  process.exit(2);
}

const errors = [];
const docs = [];
for (const file of files) {
  const text = fs.readFileSync(file, "utf8");
  parseAllDocuments(text).forEach((d, i) => {
    if (d.errors.length) {
      errors.push(`${file}: document ${i + 1}: YAML: ${d.errors[0].message}`);
      return;
    }
    const value = d.toJS();
    if (value == null) return;
    const label = `${file}: ${value.kind ?? "?"}/${value.metadata?.name ?? "?"} (document ${i + 1})`;
    const mod = modelModule(String(value.apiVersion ?? ""), String(value.kind ?? ""));
    if (!mod) {
      errors.push(`${label}: no schema for apiVersion ${value.apiVersion} kind ${value.kind} in the installed packages`);
      return;
    }
    docs.push({ label, value, mod });
  });
}

// Pass 1: TypeScript excess-property and type checking.
const gen = fs.mkdtempSync(path.join(here, ".gen-"));
try {
  const roots = [];
  const byFile = new Map();
  docs.forEach((d, n) => {
    const { lines, paths } = render(d.value);
    const header = [`import type { I${d.value.kind} as T } from ${JSON.stringify(d.mod)};`, "export const doc: T = "];
    const src = header.join("\n") + lines.join("\n") + ";\n";
    const f = path.join(gen, `doc${n}.ts`);
    fs.writeFileSync(f, src);
    roots.push(f);
    byFile.set(path.resolve(f), { d, paths, offset: header.length - 1 });
  });
  const program = ts.createProgram(roots, {
    strict: true,
    noEmit: true,
    skipLibCheck: true,
    module: ts.ModuleKind.ESNext,
    moduleResolution: ts.ModuleResolutionKind.Bundler,
    target: ts.ScriptTarget.ES2022,
    types: [],
  });
  for (const diag of ts.getPreEmitDiagnostics(program)) {
    const msg = ts.flattenDiagnosticMessageText(diag.messageText, " ");
    const entry = diag.file && byFile.get(path.resolve(diag.file.fileName));
    if (!entry) {
      errors.push(`schema checker: ${msg}`);
      continue;
    }
    const { line } = diag.file.getLineAndCharacterOfPosition(diag.start ?? 0);
    const field = entry.paths[line - entry.offset] || "(document)";
    // TypeScript prints the whole expected type; the field name is what helps.
    const unknown = /known properties, and '"?([^'"]+)"?' does not exist/.exec(msg);
    errors.push(`${entry.d.label} at ${field}: ${unknown ? `unknown field "${unknown[1]}"` : msg}`);
  }
} finally {
  fs.rmSync(gen, { recursive: true, force: true });
}

// Pass 2: the packages' JSON Schema validators.
for (const d of docs) {
  const m = await import(pathToFileURL(path.join(here, "node_modules", d.mod + ".js")).href);
  const Model = m[d.value.kind];
  try {
    new Model(d.value).validate();
  } catch (e) {
    const details = (e.errors ?? []).map((x) => `${(x.instancePath || "/").slice(1).replaceAll("/", ".")}: ${x.message}`);
    errors.push(`${d.label}: ${details.length ? details.join("; ") : e.message}`);
  }
}

if (errors.length) {
  for (const e of errors) console.error(e);
  console.error(`${errors.length} schema error(s)`);
  process.exit(1);
}
console.log(`schema ok: ${docs.length} documents in ${files.length} files`);
