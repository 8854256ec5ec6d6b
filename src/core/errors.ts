// Errors RepFuse reports to users: one sentence that names the file and the problem.

/** A problem with the user's input (file, options) that should end in a one-line message, never a stack trace. */
export class RepFuseError extends Error {
  constructor(
    message: string,
    /** The file the message is about (set by the engine when a deeper layer did not know it). */
    public file?: string,
  ) {
    super(message);
    this.name = 'RepFuseError';
  }

  /** `file: message`, on one line. */
  oneLine(): string {
    const text = clip(singleLine(this.message));
    return this.file ? `${singleLine(this.file)}: ${text}` : text;
  }
}

/** Messages quote names from the file; a hostile file's names can be megabytes long. */
const MAX_MESSAGE = 1000;

function clip(text: string): string {
  if (text.length <= MAX_MESSAGE) return text;
  return `${text.slice(0, 700)} … [${text.length - 950} characters omitted] … ${text.slice(-250)}`;
}

/**
 * Text on one line, safe for a terminal: line breaks become spaces, and control characters (often
 * bytes of a corrupt file quoted in a message: ESC sequences, CR, NUL) and the Unicode line
 * separators and bidi overrides become visible \uXXXX escapes.
 */
export function singleLine(text: string): string {
  return text
    .replace(/\s*[\r\n\u2028\u2029]+\s*/g, ' ')
    // eslint-disable-next-line no-control-regex
    .replace(/[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`);
}

/** The bytes of a file do not form what its format requires (truncated, corrupt, hostile). */
export class FormatError extends RepFuseError {
  constructor(message: string, file?: string) {
    super(message, file);
    this.name = 'FormatError';
  }
}

/** A block was detected but its parameters make exact fusion impossible (e.g. BN variance + eps <= 0). */
export class FusionError extends RepFuseError {
  constructor(message: string, file?: string) {
    super(message, file);
    this.name = 'FusionError';
  }
}

/** Formats any thrown value as one line; unknown errors keep their message but never their stack. */
export function oneLineError(err: unknown, file?: string): string {
  if (err instanceof RepFuseError) {
    if (!err.file && file) return `${singleLine(file)}: ${err.oneLine()}`;
    return err.oneLine();
  }
  const msg = err instanceof Error ? err.message : String(err);
  const text = clip(singleLine(msg));
  return file ? `${singleLine(file)}: ${text}` : text;
}
