import pino from 'pino';
import type { DaemonEvent } from './events.ts';

export type LogLevel = 'debug' | 'info' | 'warn' | 'error';
export const LOG_LEVELS: readonly LogLevel[] = ['debug', 'info', 'warn', 'error'];

export type LogFields = Record<string, string | number | boolean | undefined>;

/** What the daemon writes to stderr: a message and a few fields, at a level. */
export interface Logger {
  debug(message: string, fields?: LogFields): void;
  info(message: string, fields?: LogFields): void;
  warn(message: string, fields?: LogFields): void;
  error(message: string, fields?: LogFields): void;
}

/**
 * JSON lines (pino) for journald and log shippers, or a readable line for a
 * person at a terminal: `--log-format`, by default text on a TTY and JSON
 * elsewhere. Messages below `level` are dropped.
 */
export function createLogger(options: { level: LogLevel; format: 'json' | 'text' }): Logger {
  if (options.format === 'json') {
    const p = pino(
      {
        level: options.level,
        base: { pid: process.pid },
        timestamp: pino.stdTimeFunctions.isoTime,
      },
      pino.destination({ fd: 2, sync: true }),
    );
    return {
      debug: (m, f) => p.debug(f ?? {}, m),
      info: (m, f) => p.info(f ?? {}, m),
      warn: (m, f) => p.warn(f ?? {}, m),
      error: (m, f) => p.error(f ?? {}, m),
    };
  }
  const rank = LOG_LEVELS.indexOf(options.level);
  const line =
    (level: LogLevel) =>
    (message: string, fields?: LogFields): void => {
      if (LOG_LEVELS.indexOf(level) < rank) return;
      const extra = Object.entries(fields ?? {})
        .filter(([, v]) => v !== undefined)
        .map(([k, v]) => ` ${k}=${String(v)}`)
        .join('');
      console.error(
        `${new Date().toISOString()} ${level === 'info' ? '' : `${level}: `}${message}${extra}`,
      );
    };
  return { debug: line('debug'), info: line('info'), warn: line('warn'), error: line('error') };
}

/** Events worth a person's attention are warnings; the rest (operations, changes) are info. */
export function logEvent(log: Logger, e: DaemonEvent): void {
  const warn =
    e.type.endsWith('-failed') ||
    e.type === 'access-denied' ||
    e.type.includes('corrupt') ||
    e.type.includes('error') ||
    e.type.endsWith('-down') ||
    e.type.endsWith('-fenced');
  const fields = {
    event: e.type,
    ...(e.volume !== undefined ? { volume: e.volume } : {}),
    id: e.id,
  };
  if (warn) log.warn(e.message, fields);
  else log.info(e.message, fields);
}
