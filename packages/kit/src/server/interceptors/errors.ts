import type { Interceptor } from "@connectrpc/connect";
import { toConnectError } from "../../errors.js";

/** Converts Kiln's error classes (and anything unexpected) into Connect errors, for streams too. */
export function errorInterceptor(): Interceptor {
  return (next) => async (req) => {
    let res: Awaited<ReturnType<typeof next>>;
    try {
      res = await next(req);
    } catch (err) {
      throw toConnectError(err);
    }
    if (!res.stream) return res;
    const inner = res.message;
    return {
      ...res,
      message: (async function* () {
        try {
          yield* inner;
        } catch (err) {
          throw toConnectError(err);
        }
      })(),
    };
  };
}
