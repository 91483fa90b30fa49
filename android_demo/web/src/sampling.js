// Next-token choice over one row of logits: greedy (temperature 0) or sampled with temperature, top-k, top-p,
// min-p and a repetition penalty, from a seeded generator (the same seed gives the same tokens).

export function argmax(logits) {
  let best = 0;
  let value = logits[0];
  for (let i = 1; i < logits.length; i++) if (logits[i] > value) { value = logits[i]; best = i; }
  return best;
}

// mulberry32: a small, fast 32-bit generator; seed an integer
export function rng(seed) {
  let a = (seed >>> 0) || 0x9e3779b9;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export function checkSettings({ temperature = 0, topK = 0, topP = 1, minP = 0, repetitionPenalty = 1 } = {}) {
  const bad = (name, v, rule) => { throw new RangeError(`${name}=${v}: ${rule}`); };
  if (!(temperature >= 0)) bad('temperature', temperature, 'must be >= 0 (0 = greedy)');
  if (!(Number.isInteger(topK) && topK >= 0)) bad('topK', topK, 'must be an integer >= 0 (0 = off)');
  if (!(topP > 0 && topP <= 1)) bad('topP', topP, 'must be in (0, 1]');
  if (!(minP >= 0 && minP < 1)) bad('minP', minP, 'must be in [0, 1)');
  if (!(repetitionPenalty > 0)) bad('repetitionPenalty', repetitionPenalty, 'must be > 0 (1 = off)');
}

// Returns choose(logits, history) -> token id.  history: the ids so far (for the repetition penalty).
export function makeSampler(settings = {}) {
  checkSettings(settings);
  const { temperature = 0, topK = 0, topP = 1, minP = 0, repetitionPenalty = 1, seed = 0 } = settings;
  const random = rng(seed);
  return (logits, history = []) => {
    let row = logits;
    if (repetitionPenalty !== 1 && history.length) {
      row = Float32Array.from(logits);
      for (const id of new Set(history.slice(-64))) {  // the last 64 tokens, as edgephi's Python sampler
        row[id] = row[id] > 0 ? row[id] / repetitionPenalty : row[id] * repetitionPenalty;
      }
    }
    if (temperature === 0) return argmax(row);
    // candidates by descending logit; top-k cuts first
    let idx = Array.from(row.keys()).sort((a, b) => row[b] - row[a] || a - b);
    if (topK > 0) idx = idx.slice(0, topK);
    const top = row[idx[0]];
    let p = idx.map((i) => Math.exp((row[i] - top) / temperature));
    const total = p.reduce((s, x) => s + x, 0);
    p = p.map((x) => x / total);
    let keep = p.length;
    if (topP < 1) {
      let acc = 0;
      for (let k = 0; k < p.length; k++) { acc += p[k]; if (acc >= topP) { keep = k + 1; break; } }
    }
    if (minP > 0) keep = Math.min(keep, Math.max(1, p.filter((x) => x >= minP * p[0]).length));
    const mass = p.slice(0, keep).reduce((s, x) => s + x, 0);
    let r = random() * mass;
    for (let k = 0; k < keep; k++) { r -= p[k]; if (r <= 0) return idx[k]; }
    return idx[keep - 1];
  };
}
