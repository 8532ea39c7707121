#!/usr/bin/env node
'use strict';
// Thin launcher: run the compiled CLI (npm run build) or, in a checkout, the TypeScript source.
const path = require('node:path');
const fs = require('node:fs');
const compiled = path.join(__dirname, '..', 'dist', 'cli', 'main.js');
if (fs.existsSync(compiled)) {
  require(compiled);
} else {
  console.error('cloudlet: the CLI is not built; run `npm run build` in ' + path.join(__dirname, '..'));
  process.exit(1);
}
