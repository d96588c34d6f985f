// Runs a wasm32-wasip1 program (a cargo test binary) under Node's built-in WASI (preview1).
// Used as CARGO_TARGET_WASM32_WASIP1_RUNNER: `node .ci/wasi-run.mjs <file.wasm> [args...]`.
// The program sees its arguments, the environment and the current directory (preopened as
// "."), and its exit code becomes this process's exit code. A panic (panic=abort on wasm)
// traps with "RuntimeError: unreachable" and exits non-zero.
import { readFile } from "node:fs/promises";
import process from "node:process";

// Node 20 flags node:wasi as experimental on every run: drop that one warning, keep the others.
process.removeAllListeners("warning");
process.on("warning", (w) => {
  if (w.name !== "ExperimentalWarning") console.error(`${w.name}: ${w.message}`);
});
const { WASI } = await import("node:wasi");

const [file, ...args] = process.argv.slice(2);
if (!file) {
  console.error("usage: node wasi-run.mjs <program.wasm> [args...]");
  process.exit(2);
}
const wasi = new WASI({
  version: "preview1",
  args: [file, ...args],
  env: process.env,
  preopens: { ".": process.cwd() },
  returnOnExit: true,
});
const module = await WebAssembly.compile(await readFile(file));
const instance = await WebAssembly.instantiate(module, wasi.getImportObject());
process.exitCode = wasi.start(instance) ?? 0;
