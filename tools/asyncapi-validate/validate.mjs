// Parse an AsyncAPI document with the AsyncAPI project's own parser (@asyncapi/parser) and
// fail on any error. Read from its file, so that the relative `$ref`s to schemas/*.json
// resolve beside it. Usage: node tools/asyncapi-validate/validate.mjs docs/asyncapi.yaml
import { resolve } from 'node:path';
import { Parser, fromFile, DiagnosticSeverity } from '@asyncapi/parser';

const SEVERITY = {
  [DiagnosticSeverity.Error]: 'error',
  [DiagnosticSeverity.Warning]: 'warning',
  [DiagnosticSeverity.Information]: 'info',
  [DiagnosticSeverity.Hint]: 'hint',
};

async function main(argv) {
  if (argv.length !== 1) {
    console.error('usage: node validate.mjs PATH/TO/asyncapi.yaml');
    return 2;
  }
  const path = resolve(argv[0]);
  const parser = new Parser();
  const { document, diagnostics } = await fromFile(parser, path).parse();
  for (const d of diagnostics) {
    const where = d.path && d.path.length ? d.path.join('.') : '(document)';
    const line = d.range ? `:${d.range.start.line + 1}` : '';
    console.log(`${SEVERITY[d.severity] ?? d.severity} ${d.code} ${where}${line}: ${d.message}`);
  }
  const errors = diagnostics.filter((d) => d.severity === DiagnosticSeverity.Error);
  if (errors.length || document === undefined) {
    console.error(`${path}: ${errors.length} error(s): not a valid AsyncAPI document`);
    return 1;
  }
  const counts = {
    channels: document.channels().length,
    operations: document.operations().length,
    messages: document.messages().length,
  };
  console.log(
    `${path}: valid AsyncAPI ${document.version()} (${counts.channels} channels, ` +
      `${counts.operations} operations, ${counts.messages} messages; ` +
      `${diagnostics.length - errors.length} diagnostic(s) that are not errors)`,
  );
  return 0;
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (error) => {
    console.error(error);
    process.exit(1);
  },
);
