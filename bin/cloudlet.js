#!/usr/bin/env node
'use strict';
// Launcher: run the compiled CLI (npm run build) or, in a checkout without dist/, the TypeScript
// source through tsx (a devDependency).
const path = require('node:path');
const fs = require('node:fs');
const root = path.join(__dirname, '..');
const compiled = path.join(root, 'dist', 'cli', 'main.js');
let cli;
if (fs.existsSync(compiled)) {
  cli = require(compiled);
} else {
  let tsx;
  try {
    tsx = require('tsx/cjs/api');
  } catch {
    console.error('cloudlet: the CLI is not built and tsx is not installed; run `npm run build` (or `npm install`) in ' + root);
    process.exit(1);
  }
  tsx.register();
  cli = require(path.join(root, 'src', 'cli', 'main.ts'));
}
cli.runCli(process.argv.slice(2)).then((code) => {
  process.exitCode = code;
});
