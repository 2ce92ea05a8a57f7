// Decodes every message of a file (one per line: "m" and its hex) with webnode/syn1.js and prints one JSON line
// each: {"frames": n} or {"error": "..."}. tests/webnode/test_js_codec.py compares that with the Python decoder.
import { readFileSync } from "node:fs";

import { decodeFrames, FrameError } from "../../webnode/syn1.js";

const lines = readFileSync(process.argv[2], "utf8").split("\n").filter(Boolean);
const results = lines.map((line) => {
  try {
    return { frames: decodeFrames(Uint8Array.from(Buffer.from(line.slice(1), "hex"))).length };
  } catch (error) {
    if (!(error instanceof FrameError)) return { crash: `${error.stack}` };
    return { error: error.message };
  }
});
process.stdout.write(results.map((result) => JSON.stringify(result)).join("\n") + "\n");
