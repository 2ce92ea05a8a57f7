// Runs the page's own pure modules for the Python tests, so they check what the page does:
// `node page_code.mjs twins` prints {"<name>_f16": WGSL} made by webnode/js/twins.js from the f32 files;
// `node page_code.mjs shapes 1 4 10` prints, per row count, matmulShape() for a GPU and a CPU adapter;
// `node page_code.mjs header MANIFEST.json` prints {"hex": ...}: the safetensors header the page writes
// when it cuts that shard from a held one.
import { readFileSync } from "node:fs";

import { matmulShape } from "../../webnode/js/shapes.js";
import { safetensorsHeader } from "../../webnode/js/shards.js";
import { F16_TWINS, f16Twins } from "../../webnode/js/twins.js";

const KERNELS = new URL("../../webnode/kernels/", import.meta.url);
const [command, ...args] = process.argv.slice(2);

if (command === "twins") {
  const sources = new Map(F16_TWINS.map((name) => [name, readFileSync(new URL(`${name}.wgsl`, KERNELS), "utf8")]));
  process.stdout.write(JSON.stringify(Object.fromEntries(f16Twins(sources))));
} else if (command === "shapes") {
  const shape = (m) => ({ m, gpu: matmulShape(m, { cpu: false }), cpu: matmulShape(m, { cpu: true }) });
  const shapes = args.map(Number).map(shape);
  process.stdout.write(JSON.stringify(shapes));
} else if (command === "header") {
  const header = safetensorsHeader(JSON.parse(readFileSync(args[0], "utf8")));
  process.stdout.write(JSON.stringify({ hex: Buffer.from(header).toString("hex") }));
} else {
  process.stderr.write(`usage: node page_code.mjs twins | shapes M... | header MANIFEST.json\n`);
  process.exit(2);
}
