// Where the Python expectations live and which variants are tested (EDGEPHI_WEB_ALL=1: every tiny family).
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import assert from 'node:assert/strict';

export const WEB = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
export const FIXTURES = process.env.EDGEPHI_WEB_FIXTURES || path.join(WEB, '.fixtures');
const ALL = ['default', 'phi-2', 'phi-3-mini-4k', 'phi-4-mini', 'phi-3-mini-128k', 'phi-3-medium'];
export const VARIANTS = process.env.EDGEPHI_WEB_VARIANTS?.split(',')
  ?? (process.env.EDGEPHI_WEB_ALL === '1' ? ALL : ALL.slice(0, 4));

export function expectations() {
  const file = path.join(FIXTURES, 'expect.json');
  try {
    return JSON.parse(readFileSync(file, 'utf8'));
  } catch (e) {
    throw new Error(`${file}: ${e.message}; \`npm test\` makes it (its pretest runs test/setup.mjs)`);
  }
}

// got: token ids from the browser; exp: {tokens, gaps, scale} from the Python ONNX backend.  A difference is
// accepted only where Python's best two logits are within 1e-4 of the largest logit (a near tie that float
// summation order may flip); what follows it cannot be compared.
export function assertGreedy(got, exp, label) {
  for (let i = 0; i < exp.tokens.length; i++) {
    if (got[i] === exp.tokens[i]) continue;
    const tie = exp.gaps[i] <= 1e-4 * Math.max(1, exp.scale);
    if (tie && got[i] !== undefined) {
      console.log(`# ${label}: near tie at step ${i} (gap ${exp.gaps[i]}): tokens compared up to there`);
      return;
    }
    assert.fail(`${label}: step ${i}: browser ${got[i]}, Python ONNX backend ${exp.tokens[i]} (gap between the ` +
      `best two logits ${exp.gaps[i]}); browser ${JSON.stringify(got)}, Python ${JSON.stringify(exp.tokens)}`);
  }
}
