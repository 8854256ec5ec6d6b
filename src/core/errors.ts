// Errors RepFuse reports to users: one sentence that names the file and the problem.

/** A problem with the user's input (file, options) that should end in a one-line message, never a stack trace. */
export class RepFuseError extends Error {
  constructor(
    message: string,
    readonly file?: string,
  ) {
    super(message);
    this.name = 'RepFuseError';
  }

  /** `file: message`, on one line. */
  oneLine(): string {
    const text = this.message.replace(/\s*\n\s*/g, ' ');
    return this.file ? `${this.file}: ${text}` : text;
  }
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
    if (!err.file && file) return `${file}: ${err.oneLine()}`;
    return err.oneLine();
  }
  const msg = err instanceof Error ? err.message : String(err);
  const text = msg.replace(/\s*\n\s*/g, ' ');
  return file ? `${file}: ${text}` : text;
}
