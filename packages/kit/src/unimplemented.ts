import type { DescService } from "@bufbuild/protobuf";
import type { ServiceImpl } from "@connectrpc/connect";
import { UnimplementedError } from "./errors.js";

/**
 * An implementation of `service` whose methods all answer `unimplemented`, saying where the
 * behaviour will come from. Spread real handlers over it as they land:
 * `{ ...notImplemented(BuilderService, "issue #3"), getBuild }`.
 */
export function notImplemented<S extends DescService>(service: S, plan: string): ServiceImpl<S> {
  const impl: Record<string, unknown> = {};
  for (const method of service.methods) {
    const message = `${service.name}.${method.name} is not implemented yet (${plan})`;
    impl[method.localName] =
      method.methodKind === "server_streaming" || method.methodKind === "bidi_streaming"
        ? // biome-ignore lint/correctness/useYield: throws before yielding, by design
          async function* () {
            throw new UnimplementedError(message);
          }
        : async () => {
            throw new UnimplementedError(message);
          };
  }
  return impl as ServiceImpl<S>;
}
