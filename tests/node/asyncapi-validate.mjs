// Parses an AsyncAPI document with the official parser (@asyncapi/parser, the one AsyncAPI's
// own tools use: schema validation plus its Spectral rules) and prints every diagnostic.
// Exits 1 when there is an error; warnings and hints are printed but allowed.
//
//   node tests/node/asyncapi-validate.mjs schemas/spec/asyncapi.json
import { readFile } from "node:fs/promises";
import { resolve } from "node:path";
import { Parser } from "@asyncapi/parser";

const SEVERITY = ["error", "warning", "info", "hint"];

const [file] = process.argv.slice(2);
if (!file) {
  console.error("usage: node asyncapi-validate.mjs DOCUMENT.json|yaml");
  process.exit(2);
}
const path = resolve(file);
const { document, diagnostics } = await new Parser().parse(await readFile(path, "utf8"), {
  source: path,
});
for (const d of diagnostics) {
  const where = d.path.length ? d.path.join("/") : "(document)";
  console.log(`${SEVERITY[d.severity] ?? d.severity}  ${d.code}  ${where}: ${d.message}`);
}
const errors = diagnostics.filter((d) => d.severity === 0).length;
if (errors || !document) {
  console.log(`${file}: ${errors} error(s); not a valid AsyncAPI document`);
  process.exit(1);
}
console.log(
  `${file}: valid AsyncAPI ${document.version()}, ` +
    `${document.channels().length} channels, ${document.operations().length} operations, ` +
    `${document.messages().length} messages (${diagnostics.length} diagnostics, no errors)`,
);
