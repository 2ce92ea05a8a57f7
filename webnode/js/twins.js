// The shader-f16 twins of the kernels that read weights, generated from their f32 sources at load time:
// one .wgsl file per kernel is edited, and the page and the wgpu-py tests compile the same generated text.

/** Kernels whose weights a shader-f16 device keeps in f16; each has the twin `<name>_f16`. */
export const F16_TWINS = ["embedding", "matmul", "matvec"];

// Each of those files declares its weights' element type once, on a line of its own; the twin changes
// that line and enables the extension. Everything else (arithmetic, bindings, layout) is the f32 file's.
const ALIAS = /^alias Weight = f32;/gm;
const TWIN_ALIAS = "alias Weight = f16;";

/**
 * The source of `<name>_f16`: `enable f16;`, then the f32 source with its Weight alias set to f16.
 * @param {string} name kernel file without .wgsl (for the error message)
 * @param {string} source the f32 kernel's WGSL
 * @returns {string}
 */
export function f16Twin(name, source) {
  const found = source.match(ALIAS)?.length ?? 0;
  if (found !== 1) {
    throw new Error(`${name}.wgsl declares "alias Weight = f32;" at the start of a line ${found} times, not once`);
  }
  if (/^\s*enable\s+f16\s*;/m.test(source)) throw new Error(`${name}.wgsl already enables f16`);
  return `enable f16;\n${source.replace(ALIAS, TWIN_ALIAS)}`;
}

/**
 * Every twin of `sources` (a Map kernel name -> f32 WGSL that holds each of F16_TWINS).
 * @param {Map<string, string>} sources
 * @returns {Map<string, string>} `<name>_f16` -> WGSL
 */
export function f16Twins(sources) {
  return new Map(
    F16_TWINS.map((name) => {
      if (!sources.has(name)) throw new Error(`kernel ${name}.wgsl was not loaded: its f16 twin cannot be made`);
      return [`${name}_f16`, f16Twin(name, sources.get(name))];
    }),
  );
}
