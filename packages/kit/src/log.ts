import { type DestinationStream, type Logger, pino } from "pino";

export type { Logger };

/**
 * JSON logs on stdout, one object per line, with `service` on every line. Request-scoped
 * children add `request_id`, `tenant_id` and `rpc`; domain code adds `build_id`, `vm_id`, ….
 */
export function createLogger(opts: {
  service: string;
  level: string;
  destination?: DestinationStream;
}): Logger {
  return pino(
    {
      level: opts.level,
      base: { service: opts.service },
      timestamp: pino.stdTimeFunctions.isoTime,
      formatters: { level: (label) => ({ level: label }) },
      serializers: { err: pino.stdSerializers.err },
      redact: { paths: ["*.password", "*.token", "*.serviceToken", "*.apiKey"], censor: "***" },
    },
    opts.destination,
  );
}
