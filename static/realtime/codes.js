// Generated from realtime/protocol/codes.py by `python manage.py protocol_docs`; do not edit.
// A test fails when it differs from what the protocol declares.

// Close codes: the app's (4000s) and those the server or a proxy sends by itself.
export const Close = Object.freeze({
  NORMAL: 1000,
  NOT_AUTHENTICATED: 4001,
  FORBIDDEN: 4003,
  POLICY: 4008,
  INTERNAL: 4011,
  SERVICE_RESTART: 4012,
  OVERLOADED: 4013,
  RATE_LIMITED: 4029,
  PROTOCOL_VIOLATION: 4400,
  GOING_AWAY: 1001,
  ABNORMAL: 1006,
  TOO_LARGE: 1009,
  SERVER_ERROR: 1011,
  SERVER_RESTART: 1012,
  TRY_AGAIN_LATER: 1013,
});

// The `code` of an `error` frame.
export const ErrorCode = Object.freeze({
  INVALID: "invalid",
  UNKNOWN_TYPE: "unknown_type",
  FORBIDDEN: "forbidden",
  NOT_FOUND: "not_found",
  RATE_LIMITED: "rate_limited",
  TOO_LARGE: "too_large",
  CONFLICT: "conflict",
  RECOVERY_FAILED: "recovery_failed",
  INTERNAL: "internal",
});

// A 4012's reason `spread_ms=N`: come back within N ms (at most the MAX_MS).
export const RestartSpread = Object.freeze({
  KEY: "spread_ms",
  MAX_MS: 30000,
});
