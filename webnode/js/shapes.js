// The shapes of the work that depend on the step or the adapter: which matmul kernel and block a row count
// gets (matvec.wgsl for a few rows, every row count on CPU adapters; else matmul.wgsl with its block sized to
// the rows), and top-k's workgroup size. No GPU objects: the kernel tests run it through Node.js too.

/** Rows one matvec invocation can hold (ROWS in matvec.wgsl). */
export const MATVEC_MAX_ROWS = 8;
// Above this many rows a GPU gains from the tiled kernel's shared tiles (each w tile is read once per
// 16-64 rows instead of once per 8); a CPU adapter never does, as its workgroup memory is ordinary memory
// and every barrier a switch between fibers: SwiftShader ran a 10-row 768 x 3072 matmul 4.5x faster as
// matvec (107 ms) than with 64 x 256 blocks (487 ms).
export const MATVEC_ROWS_ON_GPU = 16;
// 64 invocations, 4 columns each: on SwiftShader 2x faster than 1 column at one row (26 vs 61 ms for
// 768 x 3072), and GPT-2's narrowest matrix (n = 768) still gives 3 workgroups.
const MATVEC = { WORKGROUP_SIZE: 64, COLUMNS: 4 };
// The tiled kernel's blocks, 256 invocations each, 4 columns an invocation; workgroup memory
// 4 * TILE_K * (rows + columns) bytes: 8,704, 10,240 and 8,192 bytes, under the 16 KiB core limit.
const TILED_BLOCKS = [
  { rows: 64, constants: { WORKGROUP_X: 16, WORKGROUP_Y: 16, ROWS_PER_THREAD: 4, TILE_K: 16 } },
  { rows: 32, constants: { WORKGROUP_X: 32, WORKGROUP_Y: 8, ROWS_PER_THREAD: 4, TILE_K: 16 } },
  { rows: 16, constants: { WORKGROUP_X: 64, WORKGROUP_Y: 4, ROWS_PER_THREAD: 4, TILE_K: 8 } },
];

/**
 * @typedef {{kernel: "matmul" | "matvec", constants: Record<string, number>, rowsPerGroup: number,
 *   columnsPerGroup: number}} MatmulShape  a pipeline's constants and the block one workgroup computes
 */

/**
 * The kernel and block for an (m, k) x (k, n) product.
 * @param {number} m rows of x
 * @param {{cpu: boolean}} device cpu: a CPU (fallback) adapter such as SwiftShader
 * @returns {MatmulShape}
 */
export function matmulShape(m, { cpu }) {
  if (cpu || m <= MATVEC_ROWS_ON_GPU) {
    const groups = Math.ceil(m / MATVEC_MAX_ROWS); // rows spread evenly: 10 rows are 2 groups of 5
    const rows = Math.ceil(m / groups);
    return {
      kernel: "matvec",
      constants: { ...MATVEC, ROWS: rows },
      rowsPerGroup: rows,
      columnsPerGroup: MATVEC.WORKGROUP_SIZE * MATVEC.COLUMNS,
    };
  }
  // The block wasting the fewest rows; on a tie the taller one (fewer workgroups read each w tile).
  const padded = (block) => Math.ceil(m / block.rows) * block.rows;
  const best = TILED_BLOCKS.reduce((chosen, block) => (padded(block) < padded(chosen) ? block : chosen));
  return {
    kernel: "matmul",
    constants: { ...best.constants },
    rowsPerGroup: best.rows,
    columnsPerGroup: 4 * best.constants.WORKGROUP_X,
  };
}

/**
 * Workgroup counts of one dispatch of `shape` over an (m, n) output.
 * @param {MatmulShape} shape
 * @returns {[number, number, number]}
 */
export function matmulGroups(shape, m, n) {
  return [Math.ceil(n / shape.columnsPerGroup), Math.ceil(m / shape.rowsPerGroup), 1];
}

/**
 * Invocations of a topk.wgsl workgroup. Each of its k rounds is a log2(size)-step tree of barriers, and on
 * SwiftShader a barrier switches between the workgroup's fibers (one per 4 invocations): GPT-2's first
 * top-64 pass took 794 ms with 256 invocations there and 24 ms with 16. GPUs keep 256 (more parallel reads).
 * @param {{cpu: boolean}} device
 */
export function topkWorkgroupSize({ cpu }) {
  return cpu ? 16 : 256;
}
