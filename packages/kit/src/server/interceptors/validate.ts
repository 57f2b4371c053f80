import type { Interceptor } from "@connectrpc/connect";
import { assertValid } from "../../validate/validator.js";

/** Checks every request message against its kiln.validate.v1 rules before the handler runs. */
export function validateInterceptor(): Interceptor {
  return (next) => async (req) => {
    const schema = req.method.input;
    if (!req.stream) {
      assertValid(schema, req.message);
      return next(req);
    }
    const inner = req.message;
    return next({
      ...req,
      message: (async function* () {
        for await (const m of inner) {
          assertValid(schema, m);
          yield m;
        }
      })(),
    });
  };
}
