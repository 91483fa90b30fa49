// Run before the browser tests (npm's pretest): vendor/ from node_modules, then the Python side's expectations
// (test/expect.py with the repository's .venv) for the variants under test, into .fixtures/ (reused while current).
import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import path from 'node:path';
import { FIXTURES, VARIANTS, WEB } from './fixtures.mjs';

execFileSync(process.execPath, [path.join(WEB, 'scripts/vendor.mjs')], { stdio: 'inherit' });
const python = process.env.EDGEPHI_PYTHON || path.resolve(WEB, '../../.venv/bin/python');
if (!existsSync(python)) {
  console.error(`${python}: missing; make the environment with \`make setup-dev\` at the repository root ` +
    '(or set EDGEPHI_PYTHON to a python with edgephi and its test extras)');
  process.exit(2);
}
execFileSync(python, [path.join(WEB, 'test/expect.py'), FIXTURES, ...VARIANTS], { stdio: 'inherit' });
