// Errors the runtime raises, each with a message a person can act on.

export class BundleLoadError extends Error {
  constructor(message, { url, cause } = {}) {
    super(message, { cause });
    this.name = 'BundleLoadError';
    this.url = url;
  }
}

export class ContextFullError extends Error {
  constructor(needed, nCtx, used) {
    super(`context full: ${needed} more tokens do not fit the ${nCtx}-token cache (${used} already used); ` +
      'start a new conversation (reset) or load with a larger nCtx');
    this.name = 'ContextFullError';
    Object.assign(this, { needed, nCtx, used });
  }
}
