// The bundle's tokenizer (tokenizer.json through @huggingface/tokenizers) and chat template (@huggingface/jinja),
// with edgephi's Python contract (edgephi/tokenizer.py): encode() adds no special tokens, the chat prompt is the
// rendered template encoded as is (the template writes the BOS where the model wants one), and a streaming
// detokenizer whose pieces concatenate to decode(ids).
import { HFTokenizer, Template } from './deps.js';

// Phi-3-mini's published template: what edgephi chats with when a checkpoint ships none (edgephi/chat_template.py)
export const PHI3_CHAT_TEMPLATE =
  "{% for message in messages %}" +
  "{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}" +
  "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}" +
  "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}" +
  "{% endif %}{% endfor %}" +
  "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}";
const ROLES = ['system', 'user', 'assistant', 'tool'];
const BYTE_PIECE = /^<0x[0-9A-Fa-f]{2}>$/;
// transformers' {% generation %} tag (Phi-4-reasoning) as an always-true block, as edgephi's portable_template
const GENERATION_TAG = /\{%(-?)\s*(end)?generation\s*(-?)%\}/g;

const tokenString = (v) => (typeof v === 'string' ? v : v && typeof v.content === 'string' ? v.content : null);

export function pickTemplate(config, jinjaFile) {
  let t = config.chat_template;
  if (Array.isArray(t)) t = (t.find((x) => x && x.name === 'default') || {}).template;
  if (t == null && jinjaFile) t = jinjaFile;
  return t ?? null;
}

export class Tokenizer {
  // json: tokenizer.json, config: tokenizer_config.json, template: chat_template.jinja text or null
  constructor(json, config = {}, template = null) {
    this.hf = new HFTokenizer(json, config);
    this.config = config;
    this.special = new Set((json.added_tokens || []).filter((t) => t.special).map((t) => t.id));
    this.bosToken = tokenString(config.bos_token);
    this.eosToken = tokenString(config.eos_token);
    this.chatTemplate = pickTemplate(config, template);
    this._template = new Template((this.chatTemplate || PHI3_CHAT_TEMPLATE).replace(
      GENERATION_TAG, (_m, a, end, b) => `{%${a}${end ? ' endif ' : ' if true '}${b}%}`));
    this.vocabSize = this.hf.get_vocab(true).size;
  }

  encode(text) {
    if (typeof text !== 'string') throw new TypeError(`encode() takes a string, got ${typeof text}`);
    return this.hf.encode(text, { add_special_tokens: false }).ids;
  }

  decode(ids, { skipSpecialTokens = false } = {}) {
    return this.hf.decode(ids, { skip_special_tokens: skipSpecialTokens });
  }

  idToToken(id) { return this.hf.id_to_token(id); }

  isByteToken(id) { return BYTE_PIECE.test(this.hf.id_to_token(id) || ''); }

  // transformers' apply_chat_template(conversation, add_generation_prompt, tokenize): text or ids
  applyChatTemplate(messages, { addGenerationPrompt = true, tokenize = true, ...vars } = {}) {
    if (!Array.isArray(messages)) throw new TypeError('messages must be an array of {role, content}');
    messages.forEach((m, k) => {
      if (!m || !ROLES.includes(m.role) || typeof m.content !== 'string') {
        throw new TypeError(`messages[${k}]: needs a role (${ROLES.join(', ')}) and a string content`);
      }
    });
    const text = this._template.render({
      messages, add_generation_prompt: addGenerationPrompt, bos_token: this.bosToken || '',
      eos_token: this.eosToken || '', ...vars,
    });
    return tokenize ? this.encode(text) : text;
  }

  detokenizer(options) { return new StreamingDetokenizer(this, options); }
}

// edgephi/tokenizer.py's StreamingDetokenizer: decodes a window (prefix .. end) so that SentencePiece's leading
// space and byte-level merges come out as in a full decode; holds text back while it ends in U+FFFD or the last
// token is a byte piece.
export class StreamingDetokenizer {
  constructor(tokenizer, { skipSpecialTokens = true } = {}) {
    this.tok = tokenizer;
    this.skip = skipSpecialTokens;
    this.reset();
  }

  reset() {
    this.ids = [];
    this.prefix = 0;
    this.read = 0;
    this.prefixText = '';
    this.text = '';
  }

  add(id) {
    if (this.skip && this.tok.special.has(id)) return '';
    this.ids.push(id);
    if (this.tok.isByteToken(id)) return '';
    const now = this._decode(this.ids.slice(this.prefix));
    if (now.length <= this.prefixText.length || now.endsWith('\ufffd') || !now.startsWith(this.prefixText)) return '';
    return this._emit(now);
  }

  flush() {
    if (this.read === this.ids.length) return '';
    const now = this._decode(this.ids.slice(this.prefix));
    if (!now.startsWith(this.prefixText)) {
      const out = this._decode(this.ids).slice(this.text.length);
      this.text += out;
      this.prefix = this.read = this.ids.length;
      this.prefixText = '';
      return out;
    }
    return this._emit(now);
  }

  _emit(now) {
    const out = now.slice(this.prefixText.length);
    this.prefix = this.read;
    this.read = this.ids.length;
    this.prefixText = this._decode(this.ids.slice(this.prefix, this.read));
    this.text += out;
    return out;
  }

  _decode(ids) { return this.tok.decode(ids, { skipSpecialTokens: this.skip }); }
}
