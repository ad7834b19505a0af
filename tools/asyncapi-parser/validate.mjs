#!/usr/bin/env node
// Validate an AsyncAPI document (YAML or JSON) with the official parser, @asyncapi/parser.
//
//   node tools/asyncapi-parser/validate.mjs FILE [--strict]
//
// Prints one line per diagnostic (severity, rule, path, message, position) to stderr, then
// `valid: FILE (N warnings)` on stdout when the document has no error.
// Exit status: 0 valid; 1 at least one error-severity diagnostic (with --strict, also any
// warning); 2 usage error or unreadable file.
// Install the parser first: npm ci --prefix tools/asyncapi-parser

import { readFile } from 'node:fs/promises';
import { resolve } from 'node:path';
import parserPackage from '@asyncapi/parser';

const { Parser, DiagnosticSeverity } = parserPackage;

const SEVERITY = {
  [DiagnosticSeverity.Error]: 'error',
  [DiagnosticSeverity.Warning]: 'warning',
  [DiagnosticSeverity.Information]: 'info',
  [DiagnosticSeverity.Hint]: 'hint',
};

function usage(message) {
  process.stderr.write(`validate.mjs: ${message}\nusage: node validate.mjs FILE [--strict]\n`);
  process.exit(2);
}

const args = process.argv.slice(2);
const strict = args.includes('--strict');
const files = args.filter((a) => a !== '--strict');
if (files.length !== 1) {
  usage(files.length === 0 ? 'no document given' : 'give exactly one document');
}

const path = resolve(files[0]);
let text;
try {
  text = await readFile(path, 'utf8');
} catch (e) {
  usage(`cannot read ${path}: ${e.message}`);
}

const parser = new Parser();
const { document, diagnostics } = await parser.parse(text, { source: path });

let errors = 0;
let warnings = 0;
for (const d of diagnostics) {
  const severity = SEVERITY[d.severity] ?? `severity-${d.severity}`;
  if (d.severity === DiagnosticSeverity.Error) errors += 1;
  if (d.severity === DiagnosticSeverity.Warning) warnings += 1;
  const where = (d.path ?? []).join('.') || '(document)';
  const start = d.range?.start;
  const position = start ? ` (line ${start.line + 1}, column ${start.character + 1})` : '';
  process.stderr.write(`${severity} ${d.code ?? ''} at ${where}: ${d.message}${position}\n`);
}

if (errors > 0 || document === undefined) {
  process.stderr.write(`invalid: ${path} (${errors} errors, ${warnings} warnings)\n`);
  process.exit(1);
}
if (strict && warnings > 0) {
  process.stderr.write(`invalid with --strict: ${path} (${warnings} warnings)\n`);
  process.exit(1);
}
process.stdout.write(`valid: ${path} (${warnings} warnings)\n`);
